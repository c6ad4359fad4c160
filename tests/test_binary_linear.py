"""BinaryLinear and its kernel backends against x @ LinearResult.dequantize().T."""

from __future__ import annotations

import pytest
import torch
from packing_utils import FLAVOURS, check_bf16_prefill, random_result

from arbq import kernels
from arbq.errors import ArbqError
from arbq.kernels import cpu
from arbq.methods.registry import scheme_for
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.codec import pack_linear

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
    for mode, tol in ((0, 1e-5), (1, 1e-5), (2, 3e-3), (3, 1e-5)):    # scalar, fp32 lanes, fp16 lanes, lookup
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
        assert _rel(cpu.matmul(p2, x, {}, mode=cpu.LUT), want) < 1e-5, plane


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
