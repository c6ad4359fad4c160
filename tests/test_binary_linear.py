"""BinaryLinear and its kernel backends against x @ LinearResult.dequantize().T."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from packing_utils import FLAVOURS, check_bf16_prefill, random_result

from arbq import kernels
from arbq.errors import ArbqError
from arbq.kernels import cpu
from arbq.methods.registry import scheme_for
from arbq.packed import lut
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.codec import full_col_scale, pack_linear

SHAPES = [(37, 200, 32), (64, 256, 128), (5, 24, 8), (9, 520, 64), (1, 136, 16), (11, 204, 32)]   # 204: K % 16 = 12


def _layer(method, cgb, n, k, bs, sd="fp32", seed=0, bias=False):
    res = random_result(n, k, method, cgb, bs, seed=seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if bias else None
    return res, BinaryLinear.from_packed(pack_linear(res, scheme_for(method, cgb), sd), bias=b, backend="torch")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method,cgb", FLAVOURS)
@pytest.mark.parametrize("n,k,bs", SHAPES)
def test_forward_equals_dequantized_matmul(method, cgb, n, k, bs):
    res, lin = _layer(method, cgb, n, k, bs, bias=True)
    x = torch.randn(2, 3, k)
    want = x @ res.dequantize().T + lin.bias
    assert _rel(lin(x), want) < 1e-6
    assert torch.equal(lin.dequantize(), res.dequantize())


def test_state_dict_holds_only_packed_tensors():
    _, lin = _layer("rc", True, 16, 64, 32, sd="fp16", bias=True)
    assert set(lin.state_dict()) == {"sign1", "group", "salient", "sign2", "values", "colscale_ns", "colscale_sal",
                                     "bias"}
    assert not list(lin.parameters())


@pytest.mark.parametrize("method,cgb", FLAVOURS)
@pytest.mark.parametrize("n,k,bs", SHAPES)
@pytest.mark.parametrize("sd", ["fp16", "bf16", "fp8"])
def test_cpu_kernel_matches_torch(ext, method, cgb, n, k, bs, sd):
    res, lin = _layer(method, cgb, n, k, bs, sd=sd, seed=1)
    p = lin.packed()
    x = torch.randn(3, k)
    want = kernels.backend("torch").matmul(p, x, {})
    # scalar, fp32 lanes, fp16 lanes, lookup with int16 tables (x rounded to 15 bits per block), fp32 tables
    for mode, tol in ((0, 1e-5), (1, 1e-5), (2, 3e-3), (3, 1e-3), (4, 1e-5)):
        assert _rel(cpu.matmul(p, x, {}, mode=mode), want) < tol, mode
    cache: dict = {}
    cpu.matmul(p, x, cache, mode=cpu.LUT)
    assert ("lut" in cache) == (p.spec.scheme.group and p.spec.scheme.salient)   # grouped schemes: table lookup
    for mode in (0, 1):                                    # dequantization: scalar and AVX-512 code
        assert torch.allclose(cpu.dequantize(p, {}, 1, n, mode=mode), lin.dequantize()[1:], rtol=1e-6, atol=1e-7)
    xb = torch.randn(cpu.BATCH_TILE + 3, k)                # batch path: dequantized tiles
    assert _rel(cpu.matmul(p, xb, {}), kernels.backend("torch").matmul(p, xb, {})) < 1e-5
    check_bf16_prefill(p)                                  # bf16 activations: bf16 panels, bf16 matmul


def test_lookup_kernel_layout_reads_every_bit(ext):
    """Flip one weight's sign (or group) bit in the packed planes: the lookup GEMV must follow it exactly."""
    res, lin = _layer("rc", True, 40, 136, 32, seed=3)     # 40 rows: a partial row group; 136 columns: quads
    x = torch.randn(1, 136)
    for plane, (i, j) in (("sign1", (39, 135)), ("group", (17, 66)), ("sign1", (0, int(res.salient.nonzero()[0])))):
        p = lin.packed()
        t = p.tensors[plane].clone()
        t[i, j // 8] ^= 1 << (j % 8)
        p2 = type(p)(p.spec, {**p.tensors, plane: t})
        want = kernels.backend("torch").matmul(p2, x, {})
        assert _rel(cpu.matmul(p2, x, {}, mode=cpu.LANE_MODES["lut32"]), want) < 1e-5, plane


def _int16_emulation(q, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the int16-table GEMV computes for an rc layer without salient columns, independently: per block t
    and group h, z_h = c_h ⊙ x (fp32), q = rint(z_h · (16383 / max_t |z_h|)) and z'_h = q · max_t |z_h| / 16383;
    y = Σ_j Ŵ_ij z'_{g_ij, j} / c_{g_ij, j} (float64)."""
    k, bs = q.spec.in_features, q.spec.blocksize
    cs = full_col_scale(q).reshape(4, k)
    w = BinaryLinear.from_packed(q).dequantize().double()
    y = torch.zeros(w.shape[0], dtype=torch.float64)
    for h, row in ((0, 0), (1, 2)):                          # group 0 / 1 use column-scale rows 0 / 2
        z = cs[row].float() * x[0].float()
        zq = torch.zeros(k, dtype=torch.float64)
        for t0 in range(0, k, bs):
            zt = z[t0:t0 + bs]
            m = zt.abs().max()
            inv = torch.tensor(16383.0) / m
            zq[t0:t0 + bs] = torch.round(zt * inv).double() * float(m / torch.tensor(16383.0))
        y += ((w * (g == h)) / cs[row].double()) @ zq
    return y


def test_lookup_int16_tables_round_only_the_inputs(ext):
    """The int16-table lookup equals an independent emulation of its one rounding (x per block to 15 bits),
    odd quad count (K = 260) and a partial last block included; its error against exact fp32 stays below
    the rounding bound and 10x above the fp32 tables' (so the int16 path is the one that ran)."""
    if "+lut16" not in ext.features():
        pytest.skip("CPU without AVX512-VNNI / VBMI: no int16 tables")
    res = random_result(40, 260, "rc", True, 64, seed=4)
    res = dataclasses.replace(res, salient=torch.zeros_like(res.salient))
    q = lut.from_binary(pack_linear(res, scheme_for("rc", True), "fp16"))
    x = torch.randn(1, 260, generator=torch.Generator().manual_seed(5))
    x[0, ::37] *= 50                                           # outliers widen their blocks' steps
    y16 = cpu.matmul(q, x, {}, mode=cpu.LUT)[0].double()
    assert _rel(y16, _int16_emulation(q, res.group, x)) < 2e-6
    exact = BinaryLinear.from_packed(q).dequantize().double() @ x[0].double()
    e16 = _rel(y16, exact)
    e32 = _rel(cpu.matmul(q, x, {}, mode=cpu.LANE_MODES["lut32"])[0].double(), exact)
    assert 10 * e32 < e16 < 1e-3


@pytest.mark.parametrize("method,cgb", [("billm", False), ("x", True)])
def test_lookup_int16_tables_without_column_scales_round_x_once(ext, method, cgb):
    """Schemes without column scales (z₀ = z₁ = x) build their three int16 tables (U, V and the group-1 sums X₁ of
    the means) from one rounding of x per block: the GEMV equals an independent emulation, per block t,
        y = Σ_j (Ŵ_ij − μ_g) x'_j + μ₀ (Σ_t x − X₁) + μ₁ X₁,   X₁ = Σ_{g=1} x'_j,   x' = rint(x · 16383 / max_t |x|) ·
    max_t |x| / 16383, with the exact fp32 block sum of x (odd quad count and a partial last block included)."""
    if "+lut16" not in ext.features():
        pytest.skip("CPU without AVX512-VNNI / VBMI: no int16 tables")
    k, bs = 260, 64
    res = random_result(40, k, method, cgb, bs, seed=6)
    res = dataclasses.replace(res, salient=torch.zeros_like(res.salient))
    q = lut.from_binary(pack_linear(res, scheme_for(method, cgb), "fp32"))     # fp32 scales: μ = res.mu exactly
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(7))
    x[0, ::37] *= 50
    w, mu = BinaryLinear.from_packed(q).dequantize().double(), res.mu.double()
    want = torch.zeros(40, dtype=torch.float64)
    for t, t0 in enumerate(range(0, k, bs)):
        xt, g = x[0, t0:t0 + bs].float(), res.group[:, t0:t0 + bs]
        m = xt.abs().max()
        xq = torch.round(xt * (torch.tensor(16383.0) / m)).double() * float(m / torch.tensor(16383.0))
        mu_g = torch.where(g, mu[:, t, 0, 1:2], mu[:, t, 0, 0:1])
        x1 = (g.double() * xq).sum(1)
        want += (w[:, t0:t0 + bs] - mu_g) @ xq + mu[:, t, 0, 0] * (xt.double().sum() - x1) + mu[:, t, 0, 1] * x1
    got = cpu.matmul(q, x, {}, mode=cpu.LUT)[0].double()
    assert _rel(got, want) < 2e-6
    exact = w @ x[0].double()
    assert 1e-6 < _rel(got, exact) < 1e-3


@pytest.mark.parametrize("n,k,bs,sd", [(37, 200, 32, "fp16"), (16, 4100, 128, "fp16"), (21, 1100, 32, "fp16"),
                                       (33, 520, 64, "fp8"), (5, 64, 32, "bf16"), (11, 70, 96, "fp16")])
def test_sign_lookup_reads_its_own_plane_and_rounds_only_the_inputs(ext, n, k, bs, sd):
    """The sign scheme's lookup (4-column subset sums of x) runs from the layer's own sign plane, K not a multiple
    of 32 (a last partial dword), of 512 (a partial last chunk of the transposed loads) and N not of 16 included:
    with int16 tables it equals an independent emulation of its one rounding (x per block to
    q = rint(x · 8191 / max |x|), μ X_t from the same q), with fp32 tables the torch backend to 1e-6."""
    res = random_result(n, k, "sign", False, bs, seed=n + k)
    p = pack_linear(res, scheme_for("sign", False), sd)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(k))
    x[0, ::29] *= 40                                            # outliers widen their blocks' steps
    cache: dict = {}
    exact = kernels.backend("torch").matmul(p, x, {})
    assert _rel(cpu.matmul(p, x, cache, mode=cpu.LANE_MODES["lut32"]), exact) < 1e-6
    assert cache["sign"][0].data_ptr() == p["sign1"].data_ptr()       # the file's plane, read in place
    if "+lut16" not in ext.features():
        return
    w = BinaryLinear.from_packed(p).dequantize().double()
    want = torch.zeros(2, n, dtype=torch.float64)
    for t0 in range(0, k, bs):
        xt = x[:, t0:t0 + bs]
        m = xt.abs().amax(1, keepdim=True)
        xq = torch.round(xt * (torch.tensor(8191.0) / m)).double() * (m / torch.tensor(8191.0)).double()
        want += xq @ w[:, t0:t0 + bs].T                       # Ŵ = μ + α s on the rounded inputs
    got = cpu.matmul(p, x, {}, mode=cpu.LUT).double()
    assert _rel(got, want) < 2e-6
    assert 1e-6 < _rel(got, exact.double()) < 1e-3


def test_cpu_kernel_fp16_lanes_fall_back_for_large_x(ext):
    _, lin = _layer("billm", False, 32, 256, 128, seed=2)
    p = lin.packed()
    x = torch.randn(1, 256) * 1e5       # beyond fp16 lanes: the kernel must switch to fp32
    want = kernels.backend("torch").matmul(p, x, {})
    assert _rel(cpu.matmul(p, x, {}, mode=2), want) < 1e-5


def test_backend_choice_and_fallback(monkeypatch):
    _, lin = _layer("x", True, 16, 64, 32)
    x = torch.randn(1, 64)
    monkeypatch.setattr(cpu, "_ext", False)                # as if the build had failed
    assert kernels.pick(lin.packed(), x, "auto") is kernels.backend("torch")
    assert kernels.pick(lin.packed(), x, "cpu") is kernels.backend("torch")
    lin.backend = None
    monkeypatch.setenv("ARBQ_KERNEL", "cpu")
    assert _rel(lin(x), x @ lin.dequantize().T) < 1e-6
    with pytest.raises(ArbqError, match="unknown kernel backend"):
        kernels.backend("cuda-magic")


def test_kernel_cache_is_reset_when_buffers_change(ext):
    _, lin = _layer("rc", True, 8, 64, 32)
    lin.backend = "cpu"
    x = torch.randn(1, 64)
    before = lin(x)
    other = pack_linear(random_result(8, 64, "rc", True, 32, seed=9), scheme_for("rc", True), "fp32")
    lin.load_state_dict(other.tensors)                     # copies in place into the same storage
    want = x @ lin.dequantize().T
    assert _rel(lin(x), want) < 3e-3 and _rel(before, want) > 0.1
    lin.sign1 = ~other["sign1"]                            # a new tensor
    assert _rel(lin(x), x @ lin.dequantize().T) < 3e-3


@pytest.mark.parametrize("method,cgb,bs", [("rc", True, 32), ("sign", False, 32), ("billm", False, 16)])
def test_decode_calls_run_bound_and_give_the_general_paths_bits(ext, monkeypatch, method, cgb, bs):
    """BinaryLinear's fast path (the backend's bound decode call) gives the general path's exact bits for every
    dtype, lead shape and bias, is really taken, and declines whenever its binding may be stale."""
    import copy
    import pickle

    _, lin = _layer(method, cgb, 37, 200, bs, sd="fp16", bias=True)
    lin.backend = None
    monkeypatch.setenv("ARBQ_KERNEL", "cpu")
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 200, generator=g), torch.randn(2, 3, 200, generator=g), torch.randn(7, 200, generator=g),
          torch.randn(1, 1, 200, generator=g).to(torch.bfloat16), torch.randn(1, 200, generator=g).half(),
          torch.randn(400, generator=g)[::2]]                                  # strided [K]
    for x in xs:
        first = lin(x)                                                         # general path, binds
        assert lin._fast is not None
        fast = lin(x)
        assert fast.dtype == x.dtype and fast.shape == (*x.shape[:-1], 37)
        assert torch.equal(fast, lin._forward(x)) and torch.equal(fast, first)
        want = (x.float() @ lin.dequantize().T).to(x.dtype) + lin.bias.to(x.dtype)
        assert _rel(fast.float(), want.float()) < 1e-2
    general, y0 = cpu.matmul, lin(xs[0])
    monkeypatch.setattr(cpu, "matmul", lambda *a, **k: pytest.fail("a bound decode call took the general path"))
    assert torch.equal(lin(xs[0]), y0)
    with pytest.raises(pytest.fail.Exception):
        lin(torch.randn(8, 200))                                               # batch >= 8: not a decode call
    monkeypatch.setattr(cpu, "matmul", general)
    x = xs[0]
    assert torch.equal(copy.deepcopy(lin)(x), lin(x)) and torch.equal(pickle.loads(pickle.dumps(lin))(x), lin(x))
    # a changed environment unbinds: fp32 tables instead of int16 ones (grouped schemes) give other bits
    monkeypatch.setenv("ARBQ_CPU_LANES", "lut32")
    assert torch.equal(lin(x), lin._forward(x))
    exact = kernels.backend("torch").matmul(lin.packed(), x, {}) + lin.bias
    assert _rel(lin(x), exact) < 1e-5
    lin.backend = "torch"                                                      # unbinds too
    assert torch.equal(lin(x), exact)
    lin.backend = None
    lin.bias.mul_(2)                                                           # a buffer changed in place
    assert _rel(lin(x), kernels.backend("torch").matmul(lin.packed(), x, {}) + lin.bias) < 1e-5


def test_module_built_in_inference_mode(ext, monkeypatch):
    """Buffers created under torch.inference_mode keep no version counter: the module still runs (bound decode
    calls and the general path), and load_state_dict, in place under inference mode, still reaches the output."""
    monkeypatch.setenv("ARBQ_KERNEL", "cpu")
    other = pack_linear(random_result(24, 96, "rc", True, 32, seed=9), scheme_for("rc", True), "fp32")
    with torch.inference_mode():
        _, lin = _layer("rc", True, 24, 96, 32, bias=True)
        lin.backend = None
        assert lin.sign1.is_inference()
        x = torch.randn(1, 96)
        for xb in (x, torch.randn(9, 96)):
            assert _rel(lin(xb), xb @ lin.dequantize().T + lin.bias) < 1e-3
        assert lin._fast is not None and torch.equal(lin(x), lin._forward(x))
        before = lin(x)
        lin.load_state_dict({**other.tensors, "bias": lin.bias.clone()})
        want = x @ lin.dequantize().T + lin.bias
        assert _rel(lin(x), want) < 1e-3 and _rel(before, want) > 0.1
