"""The "binary_lut" layout (arbq.packed.lut: the binary layout's bits interleaved by 16 rows, as the CPU lookup
kernel reads them): lossless against "binary", honest bits = formula, and the CPU kernel running it from its own
tensors (batch 1 lookup GEMV, batched Ŵᵀ panels in fp32 and bf16) against the torch backend."""

from __future__ import annotations

import pytest
import torch
from packing_utils import random_result

from arbq import kernels
from arbq.errors import ArbqError
from arbq.kernels import cpu
from arbq.methods.registry import scheme_for
from arbq.packed import layouts, lut
from arbq.packed.codec import PackedLinear, pack_linear
from arbq.packed.format import measured_bits

LUT32 = cpu.LANE_MODES["lut32"]       # the lookup with fp32 tables (the default: int16 tables)

GROUPED = [("billm", False), ("arb", True), ("x", False), ("x", True), ("rc", False), ("rc", True)]
# (N, K, blocksize): N not a multiple of 16, K not of 4 / 8 / 16, one row
SHAPES = [(37, 200, 32), (64, 256, 128), (16, 520, 64), (1, 136, 16), (50, 210, 8), (33, 4100, 128)]


def _pair(method, cgb, n, k, bs, sd="fp16", seed=0, salient_frac=0.08) -> tuple[PackedLinear, PackedLinear]:
    res = random_result(n, k, method, cgb, bs, seed=seed, salient_frac=salient_frac)
    p = pack_linear(res, scheme_for(method, cgb), sd)
    return p, lut.from_binary(p)


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("method,cgb", GROUPED)
@pytest.mark.parametrize("n,k,bs", SHAPES)
def test_same_weights_and_bits_as_binary(method, cgb, n, k, bs):
    p, q = _pair(method, cgb, n, k, bs, sd="fp8" if n == 50 else "fp16", seed=n + k)
    layouts.validate(q)
    assert torch.equal(layouts.dequantize(q), layouts.dequantize(p))       # lossless rearrangement
    assert torch.equal(layouts.dequantize(q, rows=7), layouts.dequantize(p))   # tiles across row groups
    assert measured_bits(q.tensors, q.spec) == q.spec.formula_bits()
    # the same bits: sign + group (2 per weight) = the codes, up to the padding of rows to 16 and columns to 4
    pb, qb = p.spec.formula_bits(), q.spec.formula_bits()
    n16, kq = -(-n // 16), -(-k // 4)
    assert qb["sign_and_group"] == 2 * (16 * n16) * (4 * kq)
    assert qb["second_sign"] == 16 * n16 * p.spec.n_salient <= pb["second_sign"] * 16 * n16 / n + 16 * n16 * 7
    assert qb["row_values"] - (32 if p.spec.scale_dtype == "fp8" else 0) == \
        (pb["row_values"] - (32 if p.spec.scale_dtype == "fp8" else 0)) * 16 * n16 // n
    if n % 16 == 0 and k % 8 == 0:
        assert abs(sum(qb.values()) - sum(pb.values())) <= n * 7      # sign2: int16 words vs bytes per row
    spec2 = layouts.spec_from_entry({"layout": "binary_lut", "params": q.spec.to_params()}, "m")
    assert spec2 == q.spec


def test_refuses_schemes_without_a_lookup_kernel():
    for method, cgb, bs in (("sign", False, 32), ("rc", True, 6)):     # no group bits; blocks not of 4
        p = pack_linear(random_result(16, 60, method, cgb, bs), scheme_for(method, cgb))
        with pytest.raises(ArbqError, match="binary_lut"):
            lut.from_binary(p)
    p, q = _pair("rc", True, 16, 64, 32)
    bad = PackedLinear(q.spec, {**q.tensors, "sign2": q["sign2"].to(torch.int32)})
    with pytest.raises(ArbqError, match="sign2"):
        layouts.validate(bad)
    bad = PackedLinear(q.spec, {**q.tensors, "codes": q["codes"][:, :-1]})
    with pytest.raises(ArbqError, match="codes"):
        layouts.validate(bad)


@pytest.mark.parametrize("method,cgb", GROUPED)
@pytest.mark.parametrize("n,k,bs", SHAPES)
def test_cpu_kernel_runs_it_from_its_own_tensors(ext, method, cgb, n, k, bs):
    p, q = _pair(method, cgb, n, k, bs, seed=3 * n + k)
    gen = torch.Generator().manual_seed(n)
    torch_be = kernels.backend("torch")
    assert kernels.pick(q, torch.zeros(1, k), "auto").NAME == "cpu"
    x1 = torch.randn(2, k, generator=gen)
    want1 = torch_be.matmul(p, x1, {})
    cache: dict = {}
    assert _rel(cpu.matmul(q, x1, cache), want1) < 1e-3               # lookup GEMV, int16 tables (the default)
    assert _rel(cpu.matmul(q, x1, {}, mode=LUT32), want1) < 1e-5       # fp32 tables
    ts = cache["lut"]["tensors"]                                      # the layer's own tensors, no copy
    assert [t.data_ptr() for t in ts[:2]] == [q["codes"].data_ptr(), q["sign2"].data_ptr()]
    assert ts[4].data_ptr() == q["values"].data_ptr()                 # fp16 values read in place
    assert _rel(cpu.matmul(p, x1, {}, mode=LUT32), want1) < 1e-5      # the binary layout's lookup, same code
    w = layouts.dequantize(p)
    r0 = min(5, n - 1)
    assert torch.allclose(cpu.dequantize(q, {}, r0, n), w[r0:], rtol=1e-6, atol=1e-7)
    wt = cpu.dequantize_lut_t(q, {}, 0, -(-n // 16), torch.empty(k, 16 * -(-n // 16), dtype=torch.bfloat16))
    assert torch.equal(wt.T[:n].view(torch.int16), cpu.dequantize(q, {}, 0, n).bfloat16().view(torch.int16))
    assert not wt.T[n:].float().any()                                 # padding rows are zeros
    xb = torch.randn(cpu.BATCH_TILE + 3, k, generator=gen)
    assert _rel(cpu.matmul(q, xb, {}), torch_be.matmul(p, xb, {})) < 1e-5
    y16 = cpu.matmul(q, xb.bfloat16(), {})
    assert y16.dtype == torch.bfloat16
    assert _rel(y16, xb.bfloat16().float() @ w.bfloat16().float().T) < 8e-3


@pytest.mark.parametrize("sd", ["bf16", "fp8", "fp32"])
def test_cpu_kernel_scale_dtypes(ext, sd):
    p, q = _pair("rc", True, 40, 264, 64, sd=sd, seed=2)
    x = torch.randn(3, 264)
    want = kernels.backend("torch").matmul(p, x, {})
    assert _rel(cpu.matmul(q, x, {}, mode=LUT32), want) < 1e-5
    assert _rel(cpu.matmul(q, x, {}), want) < 1e-3
    xb = torch.randn(9, 264, generator=torch.Generator().manual_seed(1))
    assert _rel(cpu.matmul(q, xb, {}), kernels.backend("torch").matmul(p, xb, {})) < 1e-5


@pytest.mark.parametrize("method,cgb", [("rc", True), ("billm", False)])
def test_salient_heavy_blocks(ext, method, cgb):
    """Half the columns salient: many salient columns per block and per code quad."""
    p, q = _pair(method, cgb, 48, 264, 64, seed=5, salient_frac=0.5)
    for m in (1, 11):
        x = torch.randn(m, 264, generator=torch.Generator().manual_seed(m))
        want = kernels.backend("torch").matmul(p, x, {})
        assert _rel(cpu.matmul(q, x, {}, mode=LUT32), want) < 1e-5
        assert _rel(cpu.matmul(q, x, {}), want) < (1e-3 if m == 1 else 1e-5)     # m = 1: int16 tables


def test_bf16_prefill_is_safe_from_several_threads(ext):
    """Each thread dequantizes into its own bf16 panel: two threads running different layers at the same time
    (torch.matmul releases the GIL between the kernel's panel writes) get their own results."""
    import threading

    layers = [_pair("rc", True, 64, 256, 64, seed=s)[s % 2] for s in (1, 2)]
    xs = [torch.randn(16, 256, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (1, 2)]
    want = [cpu.matmul(p, x, {}) for p, x in zip(layers, xs, strict=True)]
    bad: list[int] = []

    def run(i: int) -> None:
        for _ in range(30):
            if not torch.equal(cpu.matmul(layers[i], xs[i], {}), want[i]):
                bad.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
