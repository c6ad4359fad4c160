"""The Triton backend against the torch backend, run by Triton's CPU interpreter (TRITON_INTERPRET=1).

Skipped where Triton is not installed (`make install` installs it). conftest.py sets TRITON_INTERPRET=1
on machines without CUDA, before anything imports triton. On a GPU the same kernels are compiled (and
run by these tests on CPU tensors only under the interpreter); speed: `make bench --device cuda`.
"""

from __future__ import annotations

import os

import pytest
import torch
from packing_utils import FLAVOURS, random_result

from arbq import kernels
from arbq.methods.registry import scheme_for
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.codec import pack_linear

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def tk():
    """arbq.kernels.triton_gpu, interpreted (CPU tensors)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs compiled here (CUDA present): these tests use CPU tensors")
    from arbq.kernels import triton_gpu
    return triton_gpu


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method,cgb", FLAVOURS)
@pytest.mark.parametrize("n,k,bs,sd", [(37, 200, 32, "fp16"), (20, 136, 16, "bf16"), (9, 256, 128, "fp8")])
def test_triton_matches_torch(tk, method, cgb, n, k, bs, sd):
    res = random_result(n, k, method, cgb, bs, seed=4)
    p = BinaryLinear.from_packed(pack_linear(res, scheme_for(method, cgb), sd)).packed()
    assert not tk.supports(p, torch.zeros(1, k))       # never picked for CPU tensors, only called here
    ref = kernels.backend("torch")
    for m in (1, 3, tk.DOT_MIN):         # fused GEMV (m < DOT_MIN) and dequantized tiles + matmul
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        assert _rel(tk.matmul(p, x, {}), ref.matmul(p, x, {})) < 1e-5, m
    w = tk.dequantize(p, {}, 2, n)
    assert torch.allclose(w, BinaryLinear.from_packed(p).dequantize()[2:], rtol=1e-6, atol=1e-7)


def test_triton_follows_every_bit(tk):
    """Flip one sign bit in a salient and in a non-salient column: the output must follow."""
    res = random_result(24, 128, "rc", True, 32, seed=5)
    p = BinaryLinear.from_packed(pack_linear(res, scheme_for("rc", True), "fp16")).packed()
    x = torch.randn(1, 128)
    j_sal = int(res.salient.nonzero()[0])
    j_ns = int((~res.salient).nonzero()[0])
    for plane, i, j in (("sign1", 23, j_ns), ("sign2", 5, 0), ("sign1", 0, j_sal)):
        t = p.tensors[plane].clone()
        t[i, j // 8] ^= 1 << (j % 8)
        p2 = type(p)(p.spec, {**p.tensors, plane: t})
        assert _rel(tk.matmul(p2, x, {}), kernels.backend("torch").matmul(p2, x, {})) < 1e-5, plane
