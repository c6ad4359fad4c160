"""bench.e2e on tiny models: the synthetic checkpoint, the packed dirs (the bits they claim), measuring, the table."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from bench import e2e

TINY = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=4, vocab=100)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return e2e.synthetic_llama(tmp_path_factory.mktemp("e2e") / "dense", **TINY)


def _ids(vocab: int, n: int = 8) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(0))


def test_synthetic_checkpoint_loads_with_the_requested_shapes(tiny):
    from transformers import AutoModelForCausalLM

    from arbq.packed.loader import read_header, weight_files

    m = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    c = m.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size) == ("llama", 2, 64, 128, 4, 4, 100)
    sd = m.state_dict()
    assert sd["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (64, 128)
    assert sd["model.embed_tokens.weight"].shape == sd["lm_head.weight"].shape == (100, 64)
    assert not torch.equal(sd["model.embed_tokens.weight"], sd["lm_head.weight"])        # untied
    assert torch.equal(sd["model.norm.weight"], torch.ones(64))
    assert 0.018 < float(sd["model.embed_tokens.weight"].std()) < 0.022
    header = read_header(weight_files(tiny))
    assert {dt for _, dt in header.values()} == {torch.bfloat16}
    assert len(e2e.decoder_linears(c)) == 14
    # cached: the same parameters are not rebuilt, other ones are
    mtime = (tiny / "model.safetensors").stat().st_mtime_ns
    assert e2e.synthetic_llama(tiny, **TINY) == tiny and (tiny / "model.safetensors").stat().st_mtime_ns == mtime


# method -> (layout, scheme flags rc/salient/group/cgb, label)
LAYOUTS = {"rc+cgb": ("binary", (True, True, True, True), "rc+cgb"),
           "rc+cgb/lut": ("binary_lut", (True, True, True, True), "rc+cgb"),
           "billm": ("binary", (False, True, True, False), "billm"),
           "x+cgb": ("binary", (False, True, True, True), "x+cgb"),
           "sign": ("binary", (False, False, False, False), "sign"),
           "pbs2p-6of8": ("binary_nm", (True, True, True, True), "pbs2p-6:8+cgb"),
           "pbs2p-6of8/lut": ("binary_nm_lut", (True, True, True, True), "pbs2p-6:8+cgb")}


@pytest.mark.parametrize("method", list(LAYOUTS))
def test_packed_dir_holds_the_bits_it_claims(tiny, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from arbq.fileio import read_json
    from arbq.packed import load
    from arbq.packed.binary_linear import BinaryLinear
    from arbq.packed.layouts import dequantize

    out = e2e.write_packed(tiny, tmp_path / method.replace("/", "-"), method, seed=3)
    packed = load(out, resident=False)                   # manifest verified; the layouts as the file stores them
    dense = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    layout, flags, label = LAYOUTS[method]
    names = e2e.decoder_linears(dense.config)
    mods = {n: m for n, m in packed.named_modules() if isinstance(m, BinaryLinear)}
    assert sorted(mods) == sorted(names)
    for j, name in enumerate(names):
        mod = mods[name]
        assert mod.spec.layout == layout and packed.config.quantization_config["modules"][name]["method"] == label
        sc = mod.spec.scheme
        assert (sc.rc, sc.salient, sc.group, sc.cgb) == flags
        if layout.startswith("binary_nm"):
            assert (mod.spec.n, mod.spec.m) == (6, 8)
        w = mod.dequantize()
        # the file holds exactly the random linear it was made from
        want = e2e.random_linear(mod.out_features, mod.in_features, method, seed=e2e.linear_seed(3, j))
        assert torch.equal(w, dequantize(want))
        dense.get_submodule(name).weight.data = w
    for key, t in dense.state_dict().items():       # the unbinarized tensors are the checkpoint's
        if key.rpartition(".")[0] not in mods:
            assert torch.equal(packed.state_dict()[key], t), key
    ids = _ids(100)
    with torch.inference_mode():
        got, ref = packed(ids).logits, dense(ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    # honest bits: what the size report of the manifest says, and what weight_bytes counts
    wb = e2e.weight_bytes(out, "fp32")
    assert wb["bits_per_weight"] == pytest.approx(read_json(out / "arbq_manifest.json")["size"]["binarized"]
                                                  ["bpw_honest"])
    assert wb["linear_weights"] == sum(m.out_features * m.in_features for m in mods.values())
    assert wb["other_loaded_bytes"] == 2 * wb["other_bytes"]                # bf16 on disk, loaded as fp32
    assert wb["allowed_bytes"] == wb["file_bytes"] + wb["other_bytes"]


def test_measure_in_a_fresh_process(tmp_path):
    """The subprocess path, on a model whose embeddings (2 × 8192 × 256 fp32 = 16 MiB) show in the RSS."""
    from arbq.packed import load

    dense = e2e.synthetic_llama(tmp_path / "dense", layers=1, hidden=256, intermediate=512, heads=4, kv_heads=4,
                                vocab=8192)
    out = e2e.write_packed(dense, tmp_path / "packed", "rc+cgb")
    r = e2e.measure(out, "packed-rc+cgb", prompt_tokens=8, new_tokens=4, repeats=2)
    assert (r["model"], r["method"], r["dtype"]) == ("packed", "rc+cgb", "fp32")
    assert r["prefill_ms"] > 0 and r["tokens_per_s"] > 0 and len(r["tokens_per_s_all"]) == 2
    assert r["kernel_backends"] and set(r["kernel_backends"]) <= {"cpu", "torch"}
    assert r["rss_base_mb"] > 50                                  # python + torch
    assert r["other_loaded_mb"] == pytest.approx((2 * 8192 + 3) * 256 * 4 / 2**20)  # + 3 norms
    assert r["rss_load_mb"] > 0.8 * r["other_loaded_mb"]          # the fp32 embeddings are resident
    assert r["peak_rss_mb"] >= r["rss_run_mb"] > 0
    assert 0.8 < r["mem_ratio_load"] < 3
    assert r["file_mb"] == pytest.approx(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20)
    # it ran the packed model: the same greedy tokens here
    m = load(out)
    ids = _ids(8192)
    with torch.inference_mode():
        toks = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                          do_sample=False, pad_token_id=0)[0, 8:].tolist()
    assert r["tokens"] == toks


def test_measure_in_process_dense_and_bf16(tiny, tmp_path):
    d = e2e.measure(tiny, "dense-bf16", prompt_tokens=8, new_tokens=3, repeats=1, subprocess_=False)
    assert d["prefill_ms"] > 0 and d["tokens_per_s"] > 0 and d["bits_per_weight"] == 16
    assert d["allowed_mb"] == pytest.approx(d["file_mb"])        # loaded as stored
    out = e2e.write_packed(tiny, tmp_path / "sign", "sign")
    p = e2e.measure(out, "packed-sign-bf16", prompt_tokens=8, new_tokens=3, repeats=1, subprocess_=False)
    assert p["dtype"] == "bf16" and p["tokens_per_s"] > 0 and p["bits_per_weight"] < 2
    assert p["allowed_mb"] == pytest.approx(p["file_mb"])


def test_run_all_and_the_table(tiny, tmp_path, monkeypatch):
    measure = e2e.measure

    def in_process(model_dir, kind, *args):
        return measure(model_dir, kind, *args, subprocess_=False)

    monkeypatch.setattr(e2e, "measure", in_process)
    logs = []
    res = e2e.run_all(tmp_path, methods=("sign", "nope"), packed_dtypes=("fp32",), prompt_tokens=8, new_tokens=3,
                      repeats=1, dims={k: v for k, v in TINY.items() if k != "layers"}, log=logs.append)
    v = res["variants"]
    assert list(v) == ["dense-fp32", "dense-bf16", "packed-sign", "packed-nope"]
    assert "error" in v["packed-nope"] and "nope" in v["packed-nope"]["error"]
    assert not any("error" in v[k] for k in ("dense-fp32", "dense-bf16", "packed-sign"))
    assert v["dense-fp32"]["speedup_vs_fp32"] == 1.0
    assert v["packed-sign"]["speedup_vs_bf16"] == pytest.approx(v["packed-sign"]["tokens_per_s"] /
                                                                v["dense-bf16"]["tokens_per_s"])
    import json

    con = Console(record=True, width=400)
    con.print(e2e.e2e_table({"e2e": json.loads(json.dumps(res, sort_keys=True))}))   # as read from results.json
    text = con.export_text()
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert rows == ["dense (bf16 checkpoint)", "dense (bf16 checkpoint)", "packed sign", "packed nope"]
    for col in ("model", "dtype", "bits/w linears", "file MiB", "RSS MiB load / run", "file-mapped MiB", "peak MiB",
                "RSS / allowed", "prefill ms", "decode tok/s", "× dense fp32", "× dense bf16"):
        assert col in text
    row = next(line for line in text.splitlines() if "packed sign" in line)
    assert f"{v['packed-sign']['tokens_per_s']:.2f}" in row and f"{v['packed-sign']['bits_per_weight']:.3f}" in row
    assert f"{v['packed-sign']['speedup_vs_fp32']:.2f}×" in row
    assert "hidden 64, intermediate 128" in text and any("packed nope" in line for line in text.splitlines())

    from bench.report import render

    con = Console(record=True, width=400)
    render({"machine": {"cpu_model": "x", "cpu_cores": 2, "torch": "t", "torch_threads": 1, "gpu": None},
            "e2e": res}, con)
    assert "5. End-to-end greedy decode" in con.export_text()


def test_bench_run_flags():
    from bench.run import parse_args

    a = parse_args(["--e2e-layers", "3", "--skip-e2e"])
    assert a.e2e_layers == 3 and a.skip_e2e and a.e2e_repeats == 3 and a.e2e_new_tokens == 16
    q = parse_args(["--quick"])
    assert q.e2e_layers == 1 and not q.skip_e2e
