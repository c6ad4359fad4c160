"""The C++ CPU kernel on the "binary_nm" layout (arbq.kernels.cpu, arbq.packed.nm) against the torch backend:
random N:M-pruned binary linears (6:8, 5:8, 4:8, 2:4, 3:16), K not a multiple of 64 or 8, odd N, salient-heavy
blocks, every binary scheme pbs2p / stbllm can write (nm_base), batch 1 (scalar, fp32 / fp16 lanes, the lookup
GEMV with int16 and fp32 tables for RC schemes) and batched (dequantized tiles)."""

from __future__ import annotations

import pytest
import torch
from packing_utils import check_bf16_prefill, random_result
from test_nm_layout import SCHEMES, params_for

from arbq import kernels
from arbq.kernels import cpu
from arbq.kernels.bench import random_keep
from arbq.packed import layouts, nm
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.codec import PackedLinear

# (rows, K, blocksize): K = 4096 - 8 (not a multiple of 64), 1020 (a partial run inside the last 64-column word),
# 200 / 100 / 37 (not of 8 / 16), odd N
SHAPES = [(37, 200, 32), (13, 4088, 128), (7, 1020, 32), (9, 100, 16), (5, 37, 8), (16, 256, 64)]
PATTERNS = [(6, 8), (5, 8), (4, 8), (2, 4), (3, 16)]
SCALAR, FP32, FP16, LUT, LUT32 = 0, 1, 2, 3, 4


def _packed(rows, k, n, m, flavour, bs, sd="fp32", seed=0, salient_frac=0.08) -> PackedLinear:
    method, cgb = flavour
    res = nm.NMResult(random_result(rows, k, method, cgb, bs, salient_frac=salient_frac, seed=seed),
                      random_keep(rows, k, n, m, seed), n, m)
    return nm.pack(res, params_for(method, cgb, n, m, bs), sd, "layer")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _check(p: PackedLinear, seed: int = 0, fp16_tol: float = 3e-3) -> None:
    k, n = p.spec.in_features, p.spec.out_features
    gen = torch.Generator().manual_seed(seed)
    torch_be = kernels.backend("torch")
    x = torch.randn(3, k, generator=gen)
    want = torch_be.matmul(p, x, {})
    # LUT: int16 tables (x rounded to 14 bits per block for N:M); LUT32: fp32 tables
    for mode, tol in ((SCALAR, 1e-5), (FP32, 1e-5), (FP16, fp16_tol), (LUT, 1e-3), (LUT32, 1e-5)):
        cache: dict = {}
        assert _rel(cpu.matmul(p, x[:1], cache, mode=mode), want[:1]) < tol, mode
        # the lookup GEMV runs RC schemes with groups and salient columns (expanded codes + pruned sums)
        sc = p.spec.scheme
        assert ("lut" in cache) == (mode in (LUT, LUT32) and sc.rc and sc.group and sc.salient
                                    and p.spec.blocksize % 4 == 0), mode
        assert _rel(cpu.matmul(p, x, {}, mode=mode), want) < tol, mode
    w = layouts.dequantize(p)
    for mode in (SCALAR, FP32):                            # dequantization: scalar and AVX-512 code, exact zeros
        got = cpu.dequantize(p, {}, 1, n, mode=mode)
        assert torch.allclose(got, w[1:], rtol=1e-6, atol=1e-7), mode
        assert bool((got[~nm.unpack_bits(p["keep"][1:], k)] == 0).all())
    xb = torch.randn(cpu.BATCH_TILE + 3, k, generator=gen)   # batch path: dequantized tiles + matmul
    assert _rel(cpu.matmul(p, xb, {}), torch_be.matmul(p, xb, {})) < 1e-5
    check_bf16_prefill(p, seed)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,k,bs", SHAPES)
@pytest.mark.parametrize("flavour", list(SCHEMES))
def test_cpu_kernel_matches_torch_backend(ext, n, m, rows, k, bs, flavour):
    _check(_packed(rows, k, n, m, flavour, bs, seed=rows + k + n))


@pytest.mark.parametrize("sd", ["fp16", "bf16", "fp8"])
@pytest.mark.parametrize("flavour", [("rc", True), ("billm", False)])
def test_cpu_kernel_scale_dtypes(ext, sd, flavour):
    _check(_packed(21, 520, 5, 8, flavour, 64, sd=sd, seed=3))


@pytest.mark.parametrize("flavour", [("rc", True), ("rc", False), ("x", True)])
def test_salient_heavy_blocks(ext, flavour):
    """Half the columns salient: several 16-column salient words per block, many of them pruned."""
    _check(_packed(11, 264, 4, 8, flavour, 64, seed=5, salient_frac=0.5))


def test_pruned_positions_contribute_nothing(ext):
    """x nonzero only at pruned positions of row 0 (and huge there): the kernel's row 0 must be exactly the
    kept part, i.e. 0."""
    p = _packed(8, 256, 4, 8, ("billm", False), 64, seed=7)
    keep0 = nm.unpack_bits(p["keep"][:1], 256)[0]
    x = torch.where(keep0, torch.zeros(256), torch.full((256,), 1e3)).reshape(1, 256)
    for mode in (SCALAR, FP32, LUT):
        assert float(cpu.matmul(p, x, {}, mode=mode)[0, 0]) == 0.0, mode


def test_lookup_cancels_pruned_weights_exactly(ext):
    """The N:M lookup reads pruned weights as s = -1, g = 0 and adds their inputs back from the pruned-sum
    tables: with int16 tables (integer sums) row 0 is exactly 0 when x lives only on its pruned positions;
    with fp32 tables it is 0 up to rounding, and every row matches the torch backend."""
    p = _packed(24, 264, 4, 8, ("rc", True), 64, seed=9)
    keep0 = nm.unpack_bits(p["keep"][:1], 264)[0]
    x = torch.where(keep0, torch.zeros(264), torch.full((264,), 1e3)).reshape(1, 264)
    cache: dict = {}
    y = cpu.matmul(p, x, cache, mode=LUT)
    assert "lut" in cache
    if "+lut16" in ext.features():
        assert float(y[0, 0]) == 0.0
    scale = float(layouts.dequantize(p)[0].abs().max()) * 1e3
    assert abs(float(cpu.matmul(p, x, {}, mode=LUT32)[0, 0])) < 1e-6 * scale
    xr = torch.randn(1, 264)
    want = kernels.backend("torch").matmul(p, xr, {})
    assert _rel(cpu.matmul(p, xr, {}, mode=LUT32), want) < 1e-5


def test_backend_picks_cpu_for_binary_nm(ext, monkeypatch):
    p = _packed(40, 100, 5, 8, ("rc", True), 32, seed=1)
    assert kernels.backends_for("binary_nm") == ["cpu", "torch"]
    x = torch.randn(2, 100)
    assert kernels.pick(p, x, "auto").NAME == "cpu" and kernels.pick(p, x, "triton").NAME == "torch"
    mod = BinaryLinear.from_packed(p, bias=torch.randn(40), backend="cpu")
    assert _rel(mod(x), x @ layouts.dequantize(p).T + mod.bias) < 1e-3     # default: lookup, int16 tables
    cache: dict = {}
    cpu.matmul(p, x[:1], cache, mode=FP32)                  # the masked-add kernel: the file's planes in place
    assert "lut" not in cache
    ts = cache[cpu.NAME]["tensors"]                         # the file's own compact planes and keep plane, no copy
    assert [t.data_ptr() for t in (ts[0], ts[1], ts[12])] == [p[k].data_ptr() for k in ("sign1", "group", "keep")]
    derived = sum(t.numel() * t.element_size() for t in ts[2:5] + ts[6:9] + ts[13:])   # salient words, indices
    assert derived < 0.5 * sum(t.numel() * t.element_size() for t in p.tensors.values())
    monkeypatch.setattr(cpu, "_ext", False)                 # as if the build had failed: torch
    assert kernels.pick(p, x, "cpu").NAME == "torch"


@pytest.mark.parametrize("n,m", PATTERNS + [(3, 5)])
@pytest.mark.parametrize("rows,k", [(37, 200), (13, 4088), (7, 1020), (5, 37)])
def test_nm_expand_equals_the_layouts_expansion(ext, n, m, rows, k):
    """The kernel's pdep expansion (what the N:M lookup's load-time codes are built from) equals
    arbq.packed.nm.expand_plane bit for bit, m dividing 64 or not."""
    keep = random_keep(rows, k, n, m, seed=rows + k)
    bits = torch.rand(rows, k, generator=torch.Generator().manual_seed(k)) < 0.5
    compact = nm.compact_plane(bits, keep)
    want = nm.pack_bits(nm.expand_plane(compact, keep))
    assert torch.equal(ext.nm_expand(compact, nm.pack_bits(keep), k, n, m), want)
