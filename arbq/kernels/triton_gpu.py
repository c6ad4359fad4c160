"""Triton backend (CUDA): the packed bits are unpacked in registers, fused with the product.

One program owns BN rows and walks K one quantization block (B columns) at a time. Per block it loads
the rows' sign and group bytes, the block's salient map (compact index per column, -1 if non-salient),
the salient rows' second signs from the compacted plane, the rows' values and the column scales, and
rebuilds the weight tile in fp32 registers by the result equation (arbq.methods.result):

    W[i, j] = mu[k, g] + a[k, g, 0] c[g, 0, j] s1 + k a[k, g, 1] c[g, 1, j] s2,   k = salient[j], g = group bit

Batch M < DOT_MIN: y[m, rows] += sum_j W[rows, j] x[m, j] (one program per row tile and x row, fp32).
Otherwise the same tile code writes Ŵ (x's dtype) a few hundred rows at a time and torch.matmul
(cuBLAS) does the product. Correctness is tested on CPU with TRITON_INTERPRET=1 where Triton is
installed (tests/test_triton_kernel.py); speed only on a GPU (`make bench --device cuda`).
"""

from __future__ import annotations

import torch

from arbq.kernels.cpu import slot_positions
from arbq.packed.codec import PackedLinear, full_col_scale
from arbq.packed.format import unpack_bits

NAME = "triton"
LAYOUTS = ("binary",)
DOT_MIN = 16
TILE_ROWS = 1024
BLOCK_ROWS = 16
# kernel argument of each arbq.kernels.cpu.KERNEL_SLOTS entry
SLOT_ARGS = ("A00", "A01", "A10_1", "A11_1", "A10_2", "A11_2", "M00", "M01", "M10", "M11")

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the backend reports itself unsupported
    triton = None

if triton is not None:
    @triton.jit
    def _slot(vals, rows, rmask, t, T: tl.constexpr, V: tl.constexpr, P: tl.constexpr):
        """Value slot P of rows at block t, fp32 [BN] (0 where the scheme has no such slot)."""
        if P >= 0:
            return tl.load(vals + (rows * T + t) * V + P, mask=rmask, other=0.0).to(tl.float32)
        return tl.zeros(rows.shape, dtype=tl.float32)

    @triton.jit
    def _tile(sign1, group, sign2, cidx, vals, cs, rows, rmask, t, K, Kb, S2b,
              T: tl.constexpr, V: tl.constexpr, B: tl.constexpr, RC: tl.constexpr, GRP: tl.constexpr,
              SAL: tl.constexpr, A00: tl.constexpr, A01: tl.constexpr, A10_1: tl.constexpr, A11_1: tl.constexpr,
              A10_2: tl.constexpr, A11_2: tl.constexpr, M00: tl.constexpr, M01: tl.constexpr, M10: tl.constexpr,
              M11: tl.constexpr):
        """Ŵ[rows, block t] fp32 [BN, B] and the block's column mask."""
        cols = t * B + tl.arange(0, B)
        cmask = cols < K
        m2 = rmask[:, None] & cmask[None, :]
        shift = (cols % 8).to(tl.uint8)[None, :]
        byte = tl.load(sign1 + rows[:, None] * Kb + (cols // 8)[None, :], mask=m2, other=0)
        s1 = ((byte >> shift) & 1).to(tl.float32) * 2.0 - 1.0
        if GRP:
            g = ((tl.load(group + rows[:, None] * Kb + (cols // 8)[None, :], mask=m2, other=0) >> shift) & 1) != 0
        else:
            g = tl.zeros(s1.shape, dtype=tl.int1)
        a00 = _slot(vals, rows, rmask, t, T, V, A00)[:, None]
        a01 = _slot(vals, rows, rmask, t, T, V, A01)[:, None]
        a1 = tl.where(g, a01, a00)
        if RC:
            c0 = tl.load(cs + cols, mask=cmask, other=0.0)[None, :]
            c1 = tl.load(cs + 2 * K + cols, mask=cmask, other=0.0)[None, :]
            w = a1 * tl.where(g, c1, c0) * s1
        else:
            m00 = _slot(vals, rows, rmask, t, T, V, M00)[:, None]
            m01 = _slot(vals, rows, rmask, t, T, V, M01)[:, None]
            w = a1 * s1 + tl.where(g, m01, m00)
        if SAL:
            ci = tl.load(cidx + cols, mask=cmask, other=-1)
            sal = (ci >= 0)[None, :]
            cic = tl.maximum(ci, 0)
            b2 = tl.load(sign2 + rows[:, None] * S2b + (cic // 8)[None, :], mask=m2 & sal, other=0)
            s2 = ((b2 >> (cic % 8).to(tl.uint8)[None, :]) & 1).to(tl.float32) * 2.0 - 1.0
            b1 = tl.where(g, _slot(vals, rows, rmask, t, T, V, A11_1)[:, None],
                          _slot(vals, rows, rmask, t, T, V, A10_1)[:, None])
            b2v = tl.where(g, _slot(vals, rows, rmask, t, T, V, A11_2)[:, None],
                           _slot(vals, rows, rmask, t, T, V, A10_2)[:, None])
            if RC:
                d0 = tl.load(cs + cols, mask=cmask, other=0.0)[None, :]
                d1 = tl.load(cs + 2 * K + cols, mask=cmask, other=0.0)[None, :]
                e0 = tl.load(cs + K + cols, mask=cmask, other=0.0)[None, :]
                e1 = tl.load(cs + 3 * K + cols, mask=cmask, other=0.0)[None, :]
                ws = b1 * tl.where(g, d1, d0) * s1 + b2v * tl.where(g, e1, e0) * s2
            else:
                mu1 = tl.where(g, _slot(vals, rows, rmask, t, T, V, M11)[:, None],
                               _slot(vals, rows, rmask, t, T, V, M10)[:, None])
                ws = b1 * s1 + b2v * s2 + mu1
            w = tl.where(sal, ws, w)
        return tl.where(m2, w, 0.0), cmask

    @triton.jit
    def _gemv_kernel(x, y, sign1, group, sign2, cidx, vals, cs, vscale, N, K, Kb, S2b,
                     T: tl.constexpr, V: tl.constexpr, B: tl.constexpr, BN: tl.constexpr, RC: tl.constexpr,
                     GRP: tl.constexpr, SAL: tl.constexpr, A00: tl.constexpr, A01: tl.constexpr,
                     A10_1: tl.constexpr, A11_1: tl.constexpr, A10_2: tl.constexpr, A11_2: tl.constexpr,
                     M00: tl.constexpr, M01: tl.constexpr, M10: tl.constexpr, M11: tl.constexpr):
        """y[m, rows] = vscale · Σ_j Ŵ[rows, j] x[m, j]; grid (cdiv(N, BN), M)."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        m = tl.program_id(1)
        rmask = rows < N
        acc = tl.zeros((BN,), dtype=tl.float32)
        for t in range(T):
            w, cmask = _tile(sign1, group, sign2, cidx, vals, cs, rows, rmask, t, K, Kb, S2b, T, V, B, RC, GRP,
                             SAL, A00, A01, A10_1, A11_1, A10_2, A11_2, M00, M01, M10, M11)
            xv = tl.load(x + m * K + t * B + tl.arange(0, B), mask=cmask, other=0.0).to(tl.float32)
            acc += tl.sum(w * xv[None, :], axis=1)
        tl.store(y + m * N + rows, acc * vscale, mask=rmask)

    @triton.jit
    def _dequant_kernel(out, sign1, group, sign2, cidx, vals, cs, vscale, r0, N, K, Kb, S2b,
                        T: tl.constexpr, V: tl.constexpr, B: tl.constexpr, BN: tl.constexpr, RC: tl.constexpr,
                        GRP: tl.constexpr, SAL: tl.constexpr, A00: tl.constexpr, A01: tl.constexpr,
                        A10_1: tl.constexpr, A11_1: tl.constexpr, A10_2: tl.constexpr, A11_2: tl.constexpr,
                        M00: tl.constexpr, M01: tl.constexpr, M10: tl.constexpr, M11: tl.constexpr):
        """out[rows - r0, block t] = vscale · Ŵ[rows, block t]; grid (cdiv(rows, BN), T)."""
        rows = r0 + tl.program_id(0) * BN + tl.arange(0, BN)
        t = tl.program_id(1)
        rmask = rows < N
        w, cmask = _tile(sign1, group, sign2, cidx, vals, cs, rows, rmask, t, K, Kb, S2b, T, V, B, RC, GRP, SAL,
                         A00, A01, A10_1, A11_1, A10_2, A11_2, M00, M01, M10, M11)
        cols = t * B + tl.arange(0, B)
        ptr = out + (rows - r0)[:, None] * K + cols[None, :]
        tl.store(ptr, (w * vscale).to(out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def supports(p: PackedLinear, x: torch.Tensor) -> bool:
    """CUDA tensors, a power-of-two block size, Triton present. (Under TRITON_INTERPRET=1 `matmul` also runs
    on CPU tensors, which is how the tests check it; the backend is never chosen for them.)"""
    bs = p.spec.blocksize
    return triton is not None and x.device.type == "cuda" and bs >= 16 and bs & (bs - 1) == 0


def prepare(p: PackedLinear) -> dict:
    """Per-layer derived tensors on the weights' device: compact salient index per column, values in a
    dtype Triton reads (fp8 → fp32), slot positions, full column scales [4, K] (RC)."""
    spec, sc = p.spec, p.spec.scheme
    k, dev = spec.in_features, p["sign1"].device
    cidx = torch.full((k,), -1, dtype=torch.int32)
    if sc.salient:
        sal = unpack_bits(p["salient"].cpu(), k)
        cidx[sal] = torch.arange(int(sal.sum()), dtype=torch.int32)
    vals = p["values"]
    vscale = float(p["values_scale"]) if "values_scale" in p.tensors else 1.0
    if vals.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        vals = vals.float()
    pos = dict(zip(SLOT_ARGS, slot_positions(sc, -1), strict=True))
    cs = full_col_scale(p).reshape(4, k).float().contiguous() if sc.rc else torch.zeros(1)
    empty = torch.zeros(1, dtype=torch.uint8, device=dev)
    return dict(sign1=p["sign1"].contiguous(), group=p["group"].contiguous() if sc.group else empty,
                sign2=p["sign2"].contiguous() if sc.salient else empty, cidx=cidx.to(dev),
                vals=vals.contiguous(), cs=cs.to(dev), vscale=vscale, pos=pos,
                flags=dict(RC=sc.rc, GRP=sc.group, SAL=sc.salient))


def _args(p: PackedLinear, c: dict) -> tuple[tuple, dict]:
    spec = p.spec
    s2b = c["sign2"].shape[1] if c["sign2"].dim() == 2 else 1
    tensors = (c["sign1"], c["group"], c["sign2"], c["cidx"], c["vals"], c["cs"], c["vscale"])
    meta = dict(T=spec.n_blocks, V=c["vals"].shape[2], B=spec.blocksize, BN=BLOCK_ROWS, **c["flags"], **c["pos"])
    return tensors, dict(K=spec.in_features, Kb=c["sign1"].shape[1], S2b=s2b, meta=meta)


def dequantize(p: PackedLinear, cache: dict, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows r0:r1 of Ŵ [r1 - r0, K] in `dtype`, built by the Triton tile code."""
    if NAME not in cache:
        cache[NAME] = prepare(p)
    tensors, a = _args(p, cache[NAME])
    out = torch.empty(r1 - r0, p.spec.in_features, dtype=dtype, device=p["sign1"].device)
    grid = (triton.cdiv(r1 - r0, BLOCK_ROWS), p.spec.n_blocks)
    _dequant_kernel[grid](out, *tensors, r0, r1, a["K"], a["Kb"], a["S2b"], **a["meta"])
    return out


def matmul(p: PackedLinear, x: torch.Tensor, cache: dict) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] @ Ŵᵀ: fused unpack + product for M < DOT_MIN, else Ŵ tiles + torch.matmul."""
    if NAME not in cache:
        cache[NAME] = prepare(p)
    n = p.spec.out_features
    if x.shape[0] < DOT_MIN:
        xf = x.float().contiguous()
        y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
        tensors, a = _args(p, cache[NAME])
        grid = (triton.cdiv(n, BLOCK_ROWS), x.shape[0])
        _gemv_kernel[grid](xf, y, *tensors, n, a["K"], a["Kb"], a["S2b"], **a["meta"])
        return y
    dt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, n)
        y[:, r0:r1] = (x.to(dt) @ dequantize(p, cache, r0, r1, dt).T).float()
    return y
