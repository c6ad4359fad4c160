"""The "binary_nm" packed layout (arbq.packed.nm): N:M-pruned binary linears, packing, bits, refusals, and
pack → save → load → forward of a tiny model through `arbq pack` with a test-only method record."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny
from packing_utils import check_ordered_packing, random_result, runs_put_back

import arbq
from arbq import kernels
from arbq.errors import ArbqError
from arbq.kernels.bench import random_keep
from arbq.packed import layouts, nm
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.codec import PackedLinear
from arbq.packed.format import LinearSpec, Scheme, measured_bits, unpack_bits

PATTERNS = [(6, 8), (5, 8), (4, 8), (2, 4)]
# (method, cgb) -> (V values per row and block, C0 non-salient and C1 salient column-scale vectors), written out:
# rc+cgb α per (kind, group) + 2nd-order α of the 2 salient groups; billm 2 non-salient (α, μ) + salient (α¹, α², μ)
FLAVOURS = {("rc", True): (6, 2, 4), ("rc", False): (4, 2, 2), ("billm", False): (7, 0, 0),
            ("x", True): (10, 0, 0), ("sign", False): (2, 0, 0)}
SCHEMES = {("rc", True): dict(rc=True, salient=True, group=True, cgb=True),
           ("rc", False): dict(rc=True, salient=True, group=True, cgb=False),
           ("billm", False): dict(rc=False, salient=True, group=True, cgb=False),
           ("x", True): dict(rc=False, salient=True, group=True, cgb=True),
           ("sign", False): dict(rc=False, salient=False, group=False, cgb=False)}


def random_nm(rows: int, k: int, n: int, m: int, method: str = "rc", cgb: bool = True, blocksize: int = 32,
              seed: int = 0) -> nm.NMResult:
    return nm.NMResult(random_result(rows, k, method, cgb, blocksize, seed=seed), random_keep(rows, k, n, m, seed),
                       n, m)


def params_for(method: str, cgb: bool, n: int, m: int, blocksize: int = 32) -> dict:
    return {**SCHEMES[(method, cgb)], "blocksize": blocksize, "n": n, "m": m}


def packed(rows=24, k=100, n=6, m=8, method="rc", cgb=True, scale_dtype="fp32", seed=0):
    res = random_nm(rows, k, n, m, method, cgb, seed=seed)
    return res, nm.pack(res, params_for(method, cgb, n, m), scale_dtype, "layer")


def test_nm_counts_ok_partial_runs():
    keep = torch.tensor([[1, 1, 0, 0, 1, 0, 1, 0, 1, 1]], dtype=torch.bool)   # 2:4 runs, then a run of 2
    assert nm.nm_counts_ok(keep, 2, 4)
    assert not nm.nm_counts_ok(keep, 1, 4)
    assert not nm.nm_counts_ok(torch.tensor([[1, 1, 0, 0, 1, 0, 1, 0, 1, 0]], dtype=torch.bool), 2, 4)
    assert nm.nm_counts_ok(torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool), 3, 8)   # only a partial run
    for (n, m), k in zip(PATTERNS * 2, [100, 100, 100, 100, 37, 37, 37, 37], strict=True):
        assert nm.nm_counts_ok(random_keep(5, k, n, m), n, m)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("k", [100, 37])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_pack_dequantize_exact(n, m, k, flavour):
    method, cgb = flavour
    res, p = packed(24, k, n, m, method, cgb, seed=n + k)
    want = res.dequantize()
    assert want.dtype == torch.float32 and want.shape == (24, k)
    assert torch.equal(want[~res.keep], torch.zeros(int((~res.keep).sum())))
    assert torch.equal(want[res.keep], res.base.dequantize()[res.keep])
    got = layouts.dequantize(p)
    assert torch.equal(got, want)
    assert torch.equal(layouts.dequantize(p, rows=7), want)       # several row tiles
    assert bool((got[~res.keep] == 0).all())
    assert torch.equal(unpack_bits(p["keep"], k), res.keep)
    L = nm.kept_per_row(k, n, m)                                    # compacted planes: kept bits in column order
    assert p["sign1"].shape == (24, -(-L // 8))
    assert torch.equal(unpack_bits(p["sign1"], L), res.base.sign1[res.keep].reshape(24, L))
    if "group" in p.tensors:
        group = res.base.group if cgb else res.base.group & ~res.base.salient   # as the binary layout stores it
        assert torch.equal(unpack_bits(p["group"], L), group[res.keep].reshape(24, L))
        assert torch.equal(nm.expand_plane(p["group"], res.keep), group & res.keep)
    assert torch.equal(nm.expand_plane(p["sign1"], res.keep), res.base.sign1 & res.keep)
    layouts.validate(p, "layer")


def test_fp16_scales_keep_exact_zeros():
    res, p = packed(16, 100, 5, 8, "rc", True, scale_dtype="fp16")
    got = layouts.dequantize(p)
    assert bool((got[~res.keep] == 0).all())
    assert torch.allclose(got, res.dequantize(), rtol=2e-3, atol=1e-5)


def test_pruned_positions_may_hold_anything():
    """A billm result without CGB may set group bits of salient columns at pruned positions (they are never
    read); at a kept position the same bit is not representable and is refused."""
    res = random_nm(16, 64, 4, 8, "billm", False)
    sal = res.base.salient
    pruned = ~res.keep & sal
    res.base.group[pruned] = True
    p = nm.pack(res, params_for("billm", False, 4, 8), "fp32")
    assert torch.equal(layouts.dequantize(p), res.dequantize())
    res.base.group[res.keep & sal] = True
    with pytest.raises(ArbqError, match="slots"):
        nm.pack(res, params_for("billm", False, 4, 8), "fp32")


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("k", [100, 37, 64])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16", "fp8"])
def test_bits_closed_form(n, m, k, flavour, scale_dtype):
    rows, bs = 24, 32
    res, p = packed(rows, k, n, m, *flavour, scale_dtype=scale_dtype, seed=k)
    spec = p.spec
    sc = SCHEMES[flavour]
    s = int(res.salient.sum()) if sc["salient"] else 0
    v, c0, c1 = FLAVOURS[flavour]
    sb, fp8 = {"fp32": 32, "fp16": 16, "fp8": 8}[scale_dtype], scale_dtype == "fp8"
    kb, t = -(-k // 8), -(-k // bs)
    lb = -(-(n * (k // m) + min(n, k % m)) // 8)       # compacted sign / group planes: kept bits per row
    closed = {"sign": 8 * rows * lb,
              "second_sign": 8 * rows * -(-s // 8) if sc["salient"] else 0,
              "group_bit": 8 * rows * lb if sc["group"] else 0,
              "salient_bitmap": 8 * kb if sc["salient"] else 0,
              "row_values": rows * t * v * sb + (32 if fp8 else 0),
              "col_scales": (c0 * (k - s) + c1 * s) * sb + (64 if fp8 else 0) if sc["rc"] else 0,
              "nm_positions": 8 * rows * kb, "bias": 0}
    measured = measured_bits(p.tensors, spec)
    total = sum(t.numel() * t.element_size() * 8 for t in p.tensors.values())
    assert measured == spec.formula_bits() == closed
    assert total == sum(spec.formula_bits().values()) == sum(closed.values())
    assert spec.paper_bits() == (2 * n * rows * (k + s) + m) // (2 * m)   # n/m × (sign + residual), half up
    assert set(p.tensors) == set(spec.tensor_shapes())
    assert spec.kept == n * (k // m) + min(n, k % m)


@pytest.mark.parametrize("n,m,k", [(6, 8, 4096), (5, 8, 4096), (4, 8, 4096), (2, 4, 4096), (5, 8, 100)])
def test_bits_per_weight_of_signs_and_positions(n, m, k):
    """Compacted sign plane + occupancy plane = (m + n)/m bits per weight (spec/pbs2p.md §5, bitmap + signs)."""
    spec = nm.NMSpec.of(LinearSpec(16, k, 0, 128, Scheme(False, False, False, False), "fp16"), n, m)
    f = spec.formula_bits()
    if k % 64 == 0:
        assert (f["sign"] + f["nm_positions"]) / (16 * k) == (m + n) / m
    assert f["sign"] == 8 * 16 * -(-spec.kept // 8) and f["group_bit"] == 0


def test_size_report_accepts_binary_nm():
    from arbq.packed.sizes import SizeReport

    _, p = packed(24, 100, 4, 8)
    rep = SizeReport()
    rep.add("layer", p.spec, dict(p.tensors), method="nm")
    d = rep.to_dict(24 * 100, 1)
    assert d["binarized"]["measured_equals_formula"] and d["binarized"]["bpw_measured"]["nm_positions"] > 1
    assert d["linears"][0]["layout"] == "binary_nm" and d["linears"][0]["n_salient"] == p.spec.n_salient


def test_spec_params_round_trip_and_refusals():
    _, p = packed(24, 100, 5, 8)
    spec = p.spec
    params = spec.to_params()
    assert params["n"] == 5 and params["m"] == 8 and params["out_features"] == 24
    assert nm.NMSpec.from_params(params, "m") == spec
    assert layouts.spec_from_entry(json.loads(json.dumps({"layout": "binary_nm", "params": params})), "m") == spec
    assert spec.binary.layout == "binary" and spec.describe().startswith("layout=binary_nm, n:m=5:8, ")
    for bad in ({"n": 9}, {"n": 0}, {"m": 17}, {"m": 0}, {"m": "8"}, {"n": "5"}, {"n": True}, {"n": 5.0},
                {"in_features": 0}, {"rc": 1}, {"scale_dtype": "fp4"}):
        with pytest.raises(ArbqError) as e:
            nm.NMSpec.from_params(params | bad, "model.layers.0.mlp.up_proj")
        assert "\n" not in str(e.value) and "model.layers.0.mlp.up_proj" in str(e.value)
    for key in ("n", "m", "n_salient"):
        with pytest.raises(ArbqError, match=f"missing '{key}'"):
            nm.NMSpec.from_params({k: v for k, v in params.items() if k != key}, "m")


def test_result_tensors_round_trip():
    res = random_nm(12, 100, 6, 8, "x", True)
    tensors = res.to_tensors("q_proj")
    assert tensors["q_proj.nm"].tolist() == [6, 8] and tensors["q_proj.nm"].dtype == torch.int64
    back = nm.NMResult.from_tensors(tensors, "q_proj")
    assert (back.n, back.m, back.blocksize) == (6, 8, 32) and torch.equal(back.keep, res.keep)
    assert torch.equal(back.dequantize(), res.dequantize()) and back.salient is back.base.salient
    assert back.to("cpu").shape == (12, 100)
    for broken, why in ((lambda t: t.pop("q_proj.keep"), "keep"), (lambda t: t.pop("q_proj.nm"), "nm"),
                        (lambda t: t.update({"q_proj.nm": torch.tensor([6.0, 8.0])}), "nm"),
                        (lambda t: t.update({"q_proj.nm": torch.tensor([6, 8, 1])}), "nm"),
                        (lambda t: t.update({"q_proj.nm": torch.tensor([9, 8])}), "9:8"),
                        (lambda t: t.update({"q_proj.keep": t["q_proj.keep"].to(torch.uint8)}), "keep"),
                        (lambda t: t.update({"q_proj.keep": t["q_proj.keep"][:, :-1]}), "keep"),
                        (lambda t: t.pop("q_proj.sign1"), "sign1")):
        t = dict(tensors)
        broken(t)
        with pytest.raises(ArbqError, match=why) as e:
            nm.NMResult.from_tensors(t, "q_proj")
        assert "\n" not in str(e.value)
    keep = res.keep.clone()
    keep[3, 0] = ~keep[3, 0]
    with pytest.raises(ArbqError, match="not 6:8"):
        nm.NMResult(res.base, keep, 6, 8).validate("q_proj")


def test_validate_refuses_broken_planes():
    res, p = packed(24, 100, 4, 8)
    nm.validate(p, "layer")
    flipped = dict(p.tensors)
    flipped["keep"] = p["keep"].clone()
    flipped["keep"][5, 3] ^= 1
    with pytest.raises(ArbqError, match="layer: the keep plane is not 4:8"):
        layouts.validate(PackedLinear(p.spec, flipped), "layer")
    tail = dict(p.tensors)          # the partial last run (columns 96..99: 4 kept) is checked too
    tail["keep"] = p["keep"].clone()
    tail["keep"][0, 12] ^= 1
    with pytest.raises(ArbqError, match="not 4:8"):
        layouts.validate(PackedLinear(p.spec, tail), "layer")
    for bad in ({"keep": p["keep"][:, :-1]}, {"keep": p["keep"][:-1]}, {"keep": p["keep"].to(torch.int16)}):
        with pytest.raises(ArbqError, match=r"layer\.keep: expected"):
            layouts.validate(PackedLinear(p.spec, {**p.tensors, **bad}), "layer")
    with pytest.raises(ArbqError, match=r"layer\.keep"):
        layouts.validate(PackedLinear(p.spec, {k: v for k, v in p.tensors.items() if k != "keep"}), "layer")
    # compacted planes: [24, ceil(L/8)] = [24, 7] for 4:8 over 100 columns (L = 48 + 4); truncated, dense (the
    # uncompacted layout of earlier arbq) and wrong-dtype planes are refused with one line naming the tensor
    assert p["sign1"].shape == p["group"].shape == (24, 7)
    for key in ("sign1", "group"):
        for bad in (p[key][:, :-1], p[key][:-1], torch.zeros(24, 13, dtype=torch.uint8), p[key].to(torch.int16)):
            with pytest.raises(ArbqError, match=rf"layer\.{key}: expected torch.uint8 \(24, 7\)") as e:
                layouts.validate(PackedLinear(p.spec, {**p.tensors, key: bad}), "layer")
            assert "\n" not in str(e.value)
    sal = dict(p.tensors)
    sal["salient"] = torch.zeros_like(p["salient"])
    with pytest.raises(ArbqError, match="salient bitmap"):
        layouts.validate(PackedLinear(p.spec, sal), "layer")


def test_pack_refuses_mismatched_params():
    res = random_nm(16, 64, 4, 8)
    for bad in ({"n": 5}, {"m": 4}, {"n": 2, "m": 4}):
        with pytest.raises(ArbqError, match="4:8 sparse") as e:
            nm.pack(res, params_for("rc", True, 4, 8) | bad, "fp16", "down_proj")
        assert "\n" not in str(e.value) and "down_proj" in str(e.value)
    with pytest.raises(ArbqError, match="blocksize"):
        nm.pack(res, params_for("rc", True, 4, 8, blocksize=64), "fp16")
    keep = res.keep.clone()
    keep[0, :8] = True
    with pytest.raises(ArbqError, match="not 4:8"):
        nm.pack(nm.NMResult(res.base, keep, 4, 8), params_for("rc", True, 4, 8), "fp16")


def test_binary_linear_runs_on_torch_backend():
    res, p = packed(40, 100, 5, 8)
    assert kernels.backends_for("binary_nm") == ["cpu", "torch"]     # the C++ kernel: tests/test_nm_kernel.py
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    for name in ("triton", "torch"):                      # the Triton kernel runs the binary layout only
        assert kernels.pick(p, x, name).NAME == "torch"
    mod = BinaryLinear.from_packed(p, bias=torch.randn(40), backend="torch")
    assert torch.allclose(mod(x), x @ res.dequantize().T + mod.bias, atol=1e-5)
    assert torch.equal(mod.dequantize(), res.dequantize())
    assert "layout=binary_nm, n:m=5:8" in repr(mod)


# ---- pack → save → load → forward, through `arbq pack` with a test-only method record ----

@pytest.fixture
def nm_method(monkeypatch):
    """A method record writing "binary_nm" (4:8, rc+cgb), registered for this test only: the real N:M methods
    live in arbq.methods (their own tests)."""
    from arbq.methods import registry
    from arbq.methods.record import MethodRecord

    def fit(*_):
        raise AssertionError("not called: the run is written by the test")

    rec = MethodRecord(name="nm_test", summary="test", fit=fit, layout="binary_nm",
                       layout_params=lambda cfg: {**SCHEMES[("rc", True)], "cgb": cfg.cgb, "blocksize": cfg.blocksize,
                                                  "n": 4, "m": 8},
                       result_type=nm.NMResult, keys=("cgb", "blocksize", "scale_dtype"))
    monkeypatch.setitem(registry.METHODS, "nm_test", rec)
    return rec


def test_pack_load_forward_tiny_model(tmp_path, nm_method, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from arbq.models.arch import arch_for
    from arbq.stages.pack import run_pack
    from arbq.stages.run_dir import RUN_FORMAT, RunDir

    monkeypatch.setenv("ARBQ_KERNEL", "auto")   # the C++ kernel where it builds (else torch)
    model_dir = save_tiny(tmp_path / "tiny")
    cfg = AutoConfig.from_pretrained(model_dir)
    spec = arch_for(cfg.model_type)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rd, results = RunDir(tmp_path / "run"), {}
    for i in range(cfg.num_hidden_layers):
        layer = {}
        for j, name in enumerate(spec.linears):
            n_out, k = ref.model.layers[i].get_submodule(name).weight.shape
            layer[name] = results[(i, name)] = random_nm(n_out, k, 4, 8, "rc", True, 32, seed=100 * i + j)
        rd.write_layer(i, layer, [{"layer": i, "linear": n} for n in layer], dict.fromkeys(layer, "nm_test"))
    (tmp_path / "run" / "run.json").write_text(json.dumps({
        "format": RUN_FORMAT, "model": str(model_dir), "model_type": cfg.model_type,
        "num_layers": cfg.num_hidden_layers, "linears": list(spec.linears),
        "recipe": {"method": "nm_test", "cgb": True, "blocksize": 32, "scale_dtype": "fp32"},
        "calib": {"manifest_sha256": "c0ffee"}}))
    rep = run_pack([tmp_path / "run"], tmp_path / "packed", dtype="fp32", scale_dtype="fp32")
    b = rep["binarized"]
    assert b["measured_equals_formula"] and b["linears"] == 2 * len(spec.linears)
    assert b["bpw_measured"]["nm_positions"] == pytest.approx(1.0)
    assert b["bpw_paper"] < 0.6 < 2.0 < b["bpw_honest"]          # 4:8 "0.5x bits" vs what is written
    q = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    entry = q["modules"]["model.layers.0.mlp.down_proj"]
    assert entry["layout"] == "binary_nm" and entry["method"] == "nm_test+cgb" and entry["params"]["n"] == 4

    from arbq.kernels import cpu

    # on the CPU the lookup kernel's layout is held instead of the file's (arbq.packed.loader.adopt_resident_forms)
    lookup = cpu.extension() is not None and hasattr(cpu.extension(), "gemv_lut")
    model = arbq.load(tmp_path / "packed")
    lin = model.model.layers[1].mlp.down_proj
    assert isinstance(lin, BinaryLinear) and lin.spec.layout == ("binary_nm_lut" if lookup else "binary_nm")
    assert arbq.load(tmp_path / "packed", resident=False).model.layers[1].mlp.down_proj.spec.layout == "binary_nm"
    for (i, name), res in results.items():
        ref.model.layers[i].get_submodule(name).weight.data = res.dequantize()
        assert torch.equal(model.model.layers[i].get_submodule(name).dequantize(), res.dequantize())
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
        assert torch.allclose(hf(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        # decode-sized calls (< 8 rows) run the N:M lookup GEMV where the kernel builds: int16 tables (x rounded
        # to 14 bits per block; measured 2e-4 of the largest logit here) and fp32 tables
        one = ids[:1, :3]
        want = ref(one).logits
        assert float((model(one).logits - want).abs().max()) < 1e-3 * float(want.abs().max())
        monkeypatch.setenv("ARBQ_CPU_LANES", "lut32")
        assert torch.allclose(model(one).logits, want, atol=1e-5, rtol=1e-5)
    if cpu.extension() is not None:
        assert "lut" in lin.kernel_cache()
    # `arbq pack --interleave`: the kernel's own layout (binary_nm_lut), 3 bits per weight for codes + positions
    rep2 = run_pack([tmp_path / "run"], tmp_path / "packed_lut", dtype="fp32", scale_dtype="fp32", interleave=True)
    b2 = rep2["binarized"]
    assert b2["measured_equals_formula"] and b2["bpw_paper"] == b["bpw_paper"]
    assert b2["bpw_measured"]["nm_positions"] == pytest.approx(1.0, rel=0.1)      # rows padded to 16
    assert b2["bpw_honest"] > b["bpw_honest"] + 0.9                               # 3 vs 1 + 2·4/8 bits
    q2 = json.loads((tmp_path / "packed_lut" / "config.json").read_text())["quantization_config"]
    assert {e["layout"] for e in q2["modules"].values()} == {"binary_nm_lut"}
    model2 = arbq.load(tmp_path / "packed_lut")
    for (i, name), res in results.items():
        assert torch.equal(model2.model.layers[i].get_submodule(name).dequantize(), res.dequantize())
    with torch.no_grad():
        assert torch.allclose(model2(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / "packed_lut", dtype=torch.float32)
        assert torch.allclose(hf2(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        assert float((model2(one).logits - want).abs().max()) < 1e-3 * float(want.abs().max())
    if cpu.extension() is not None:
        lin2 = model2.model.layers[1].mlp.down_proj
        assert lin2.kernel_cache()["lut"]["tensors"][0].data_ptr() == lin2.codes.data_ptr()   # no copy



def _ordered(rows: int = 24, k: int = 100, n: int = 6, m: int = 8, seed: int = 0) -> nm.NMResult:
    """random_nm with a random run order (nm_act_order): base and keep hold the model's columns π."""
    order = torch.randperm(k // m, generator=torch.Generator().manual_seed(seed))
    res = random_nm(rows, k, n, m, seed=seed)
    return nm.NMResult(res.base, res.keep, n, m, order)


@pytest.mark.parametrize("k,m,n", [(100, 8, 6), (64, 8, 4), (37, 4, 2)])
def test_run_order_is_stored_and_every_path_reads_the_model_order(k, m, n):
    """A run order (nm_act_order): Ŵ in the model's order is the stored Ŵ with its columns put back at π (the
    obvious loop), packs and reads back exactly (binary_nm and its lookup form), costs 16 bits per run of m in
    its own honest-bits component, and every backend computes x @ Ŵᵀ with the model's x."""
    res = _ordered(24, k, n, m, seed=k)
    want = runs_put_back(torch.where(res.keep, res.base.dequantize(), torch.zeros(())), res.order.tolist(), m)
    assert torch.equal(res.dequantize(), want)
    p = nm.pack(res, params_for("rc", True, n, m), "fp32", "layer")
    check_ordered_packing(p, want, "binary_nm", atol=1e-4)


@pytest.mark.parametrize("bad", ["repeated", "short", "float"])
def test_a_broken_run_order_is_refused(bad):
    """A run order that is not a permutation of the runs, in the fit's result or in a packed file: one line."""
    res = _ordered()
    order = {"repeated": torch.zeros(12, dtype=torch.int64), "short": res.order[:-1],
             "float": res.order.float()}[bad]
    with pytest.raises(ArbqError, match="run_order is not a permutation"):
        nm.NMResult.from_tensors({**res.to_tensors("l"), "l.run_order": order}, "l")
    p = nm.pack(res, params_for("rc", True, 6, 8), "fp32", "layer")
    with pytest.raises(ArbqError, match="run_order"):
        layouts.validate(PackedLinear(p.spec, {**p.tensors, "run_order": order}), "layer")
