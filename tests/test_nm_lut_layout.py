"""The "binary_nm_lut" layout (arbq.packed.nm_lut: a binary_nm linear's expanded codes and occupancy plane
interleaved by 16 rows, as the CPU N:M lookup reads them): lossless against binary_nm, honest bits = formula,
bad files refused, and the CPU kernel running it from its own tensors (lookup GEMV with int16 and fp32 tables,
batched Ŵᵀ panels in fp32 and bf16) against the torch backend, with no load-time copy of the planes."""

from __future__ import annotations

import pytest
import torch
from test_nm_kernel import LUT, LUT32, PATTERNS, SHAPES, _packed

from arbq import kernels
from arbq.errors import ArbqError
from arbq.kernels import cpu
from arbq.packed import layouts, nm, nm_lut
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.codec import PackedLinear
from arbq.packed.format import measured_bits

RC = [("rc", True), ("rc", False)]


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("rows,k,bs", SHAPES)
def test_same_weights_as_binary_nm_and_bits_by_formula(n, m, rows, k, bs):
    p = _packed(rows, k, n, m, ("rc", True), bs, sd="fp16", seed=rows + k + n)
    q = nm_lut.from_nm(p)
    layouts.validate(q)
    assert torch.equal(layouts.dequantize(q), layouts.dequantize(p))          # lossless, exact zeros where pruned
    assert torch.equal(layouts.dequantize(q, rows=7), layouts.dequantize(p))  # tiles across row groups
    bits = measured_bits(q.tensors, q.spec)
    assert bits == q.spec.formula_bits()
    n16 = -(-rows // 16)
    assert bits["nm_positions"] == 8 * 16 * n16 * -(-k // 8) and bits["sign_and_group"] == 8 * 16 * n16 * -(-k // 4)
    pb = measured_bits(p.tensors, p.spec)
    if rows % 16 == 0 and k % 64 == 0:     # 3 bits per weight for codes + positions, against 1 + 2n/m
        assert bits["sign_and_group"] + bits["nm_positions"] == 3 * rows * k
        assert pb["sign"] + pb["group_bit"] + pb["nm_positions"] == rows * k + 2 * rows * nm.kept_per_row(k, n, m)
    assert q.spec.paper_bits() == p.spec.paper_bits()
    spec2 = layouts.spec_from_entry({"layout": "binary_nm_lut", "params": q.spec.to_params()}, "m")
    assert spec2 == q.spec and q.spec.nm == p.spec


def test_refuses_schemes_and_files_it_cannot_hold():
    p = _packed(16, 64, 4, 8, ("billm", False), 32)              # means, no column scales: no N:M lookup
    with pytest.raises(ArbqError, match="binary_nm_lut"):
        nm_lut.from_nm(p)
    q = nm_lut.from_nm(_packed(16, 64, 4, 8, ("rc", True), 32))
    bad = dict(q.tensors)
    keep = bad["keep"].clone()
    keep[0, 0, 0] ^= 1                                           # one more (or one fewer) kept weight in a run
    with pytest.raises(ArbqError, match="not 4:8"):
        layouts.validate(PackedLinear(q.spec, {**bad, "keep": keep}))
    pruned = ~nm_lut.keep_rows(q, 0, 16)
    j = int(pruned[0].nonzero()[0, 0])                           # a pruned column of row 0
    codes = bad["codes"].clone()
    codes[0, j // 4, 0] |= 1 << (2 * (j % 4))                    # its sign bit set: the kernel would misread it
    with pytest.raises(ArbqError, match="pruned positions"):
        layouts.validate(PackedLinear(q.spec, {**bad, "codes": codes}))
    with pytest.raises(ArbqError, match="keep: expected"):
        layouts.validate(PackedLinear(q.spec, {**bad, "keep": keep[:, :-1]}))


@pytest.mark.parametrize("flavour", RC)
@pytest.mark.parametrize("n,m", [(6, 8), (4, 8), (3, 16)])
@pytest.mark.parametrize("rows,k,bs", [(37, 200, 32), (13, 4088, 128), (16, 256, 64)])
def test_cpu_kernel_runs_it_from_its_own_tensors(ext, flavour, n, m, rows, k, bs):
    p = _packed(rows, k, n, m, flavour, bs, sd="fp16", seed=rows + n)
    q = nm_lut.from_nm(p)
    assert kernels.pick(q, torch.zeros(1, k), "auto").NAME == "cpu"
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=gen)
    want = kernels.backend("torch").matmul(p, x, {})
    for mode, tol in ((LUT, 1e-3), (LUT32, 1e-5)):
        cache: dict = {}
        assert _rel(cpu.matmul(q, x, cache, mode=mode), want) < tol, mode
        ts = cache["lut"]["tensors"]                 # the layer's own codes and keep bytes, not a copy
        assert ts[0].data_ptr() == q["codes"].data_ptr() and ts[-1].data_ptr() == q["keep"].data_ptr()
        assert torch.equal(cpu.matmul(q, x[:1], {}, mode=mode), cpu.matmul(p, x[:1], {}, mode=mode))
    xb = torch.randn(cpu.BATCH_TILE + 3, k, generator=gen)         # batched: Ŵᵀ panels, exact zeros where pruned
    assert _rel(cpu.matmul(q, xb, {}), kernels.backend("torch").matmul(p, xb, {})) < 1e-5
    wt = cpu.dequantize_lut_t(q, {}, 0, -(-rows // 16), torch.empty(k, 16 * -(-rows // 16)))
    assert torch.equal(wt.T[:rows], layouts.dequantize(p))
    xb16 = xb.to(torch.bfloat16)
    got16 = cpu.matmul(q, xb16, {})
    assert got16.dtype == torch.bfloat16
    assert _rel(got16, xb16.float() @ layouts.dequantize(p).to(torch.bfloat16).float().T) < 1e-2


def test_module_decodes_it(ext, monkeypatch):
    """A BinaryLinear holding binary_nm_lut tensors: decode calls through the lookup from the layer's buffers."""
    q = nm_lut.from_nm(_packed(40, 136, 6, 8, ("rc", True), 8, sd="fp16", seed=4))
    mod = BinaryLinear.from_packed(q, bias=torch.randn(40))
    monkeypatch.setenv("ARBQ_KERNEL", "auto")
    x = torch.randn(1, 136)
    want = x @ layouts.dequantize(q).T + mod.bias
    assert _rel(mod(x), want) < 1e-3 and _rel(mod(x), want) < 1e-3
    assert mod._fast is not None
