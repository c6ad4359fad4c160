"""CPU backend: a C++ kernel (binary_gemv.cpp) built on first use, GEMV straight from the bits.

The kernel is built on first use by arbq.kernels.cpu_build (per CPU and source hash, with a timeout and a
sha256 check); if it cannot be built the backend reports itself unsupported and the torch backend is used.

Layouts: "binary", "binary_nm" (arbq.packed.nm, any n:m), "binary_lut" (arbq.packed.lut) and "binary_nm_lut"
(arbq.packed.nm_lut). The kernel reads binary_nm's compacted sign / group planes and its occupancy plane as
stored, expanding each row in per-thread scratch (one pdep per 64 columns); pruned positions contribute exactly
0. Table lookup (ARBQ_CPU_LANES=lut) runs "binary" (from a load-time copy in its own layout), "binary_lut" and
"binary_nm_lut" (from the layer's own tensors) and binary_nm of RC schemes (from a load-time copy, its
binary_nm_lut form: the expanded sign / group codes and the keep plane by 16 rows; pruned weights are cancelled
by pruned-sum tables); other binary_nm layers (and ARBQ_CPU_LANES=fp32) use the fp32 masked-add kernel at batch
1, which reads the file's compacted planes in place (fp16 lanes with ARBQ_CPU_LANES=fp16).

Batch M < BATCH_TILE: the kernel loops over x rows (memory-bound decode). M >= BATCH_TILE: rows of Ŵ
are dequantized TILE_ROWS at a time by the kernel and multiplied with torch.matmul (compute-bound
prefill); with bf16 activations (or ARBQ_CPU_PREFILL=bf16) the kernel writes bf16 panels and the matmul
runs in bf16 (oneDNN, AMX on CPUs that have it): ≈ 3× dense fp32 at 128 × 4096 × 4096 on 2 cores.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import torch

from arbq.kernels import cpu_build
from arbq.packed import lut, nm_lut
from arbq.packed.codec import PackedLinear, decode_scales, full_col_scale
from arbq.packed.format import pack_bits, unpack_bits
from arbq.packed.layouts import lookup_form
from arbq.packed.nm import KEEP, ROWS, expand_plane

NAME = "cpu"
LAYOUTS = ("binary", "binary_nm", "binary_lut", "binary_nm_lut")
OWN_LUT = ("binary_lut", "binary_nm_lut")     # layouts the lookup reads in place (their only kernels: GEMV, dequant)
BATCH_TILE = 8
TILE_ROWS = 256
# bf16 prefill: Ŵ rows per panel = PANEL_BYTES / (2 K). 4 MiB measured best of 0.5-16 MiB on a 2-core Zen 4 (L2 1 MiB,
# L3 32 MiB) at batch 32 and 128 (16 MiB: 10-25% slower), even at 512
PANEL_BYTES = 4 << 20
# kernel slot order of binary_gemv.cpp: alpha (kind, group, order), then mu (kind, group)
KERNEL_SLOTS = (("alpha", 0, 0, 0), ("alpha", 0, 1, 0), ("alpha", 1, 0, 0), ("alpha", 1, 1, 0),
                ("alpha", 1, 0, 1), ("alpha", 1, 1, 1), ("mu", 0, 0), ("mu", 0, 1), ("mu", 1, 0), ("mu", 1, 1))
ZERO_LANE = 15
# ARBQ_CPU_LANES: the batch-1 GEMV. lut (default): table lookup, rows in lanes (grouped schemes, and the sign
# scheme with block size a multiple of 32: 4-column subset sums, int16 steps max |x| / 8191; others use fp32
# lanes) with int16 tables where the CPU has AVX512-VNNI and VBMI and the block size is a multiple of 8:
# the inputs are rounded to 15 bits per block (max |c x| / 16383 steps; ~5e-5 of max |y| for Gaussian x, ~3e-4
# with 50x outliers), the sums are exact; else fp32 tables. lut32: fp32 tables, matches the torch backend to
# ~1e-6. fp32: masked adds along K; fp16 (AVX512-FP16 CPUs): masked adds in fp16 lanes, ~1e-3 relative error per
# linear, fp32 where x is large; scalar: plain C++.
LANE_MODES = {"scalar": 0, "fp32": 1, "fp16": 2, "lut": 3, "lut32": 4}
LUT = 3
TABLE_BITS = {LUT: 16, LANE_MODES["lut32"]: 32}      # lookup modes: bits of a table entry
ENV = ("ARBQ_CPU_LANES",)      # the environment a bound decode call (bind) depends on

_ext = None


def slot_positions(sc, missing: int) -> list[int]:
    """For each KERNEL_SLOTS entry, its index among the values the scheme stores (`missing` if none)."""
    names = [("alpha", *a) for a in sc.alpha_slots] + [("mu", *m) for m in sc.mu_slots]
    return [names.index(s) if s in names else missing for s in KERNEL_SLOTS]


def extension():
    """The compiled module, or None if it cannot be built here (the reason is one warning line, once)."""
    global _ext
    if _ext is None:
        try:
            _ext = cpu_build.load_verified(cpu_build.library_name())
        except Exception as e:  # any build failure means: use the torch backend
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            print(f"arbq: warning: C++ kernel unavailable, using the torch backend ({type(e).__name__}: {reason})",
                  file=sys.stderr)
            _ext = False
    return _ext or None


def supports(p: PackedLinear, x: torch.Tensor) -> bool:
    """CPU tensors and a built kernel; binary_lut and binary_nm_lut need the AVX-512 build (the lookup kernel)."""
    ext = extension()
    return (x.device.type == "cpu" and p.device.type == "cpu" and ext is not None
            and (p.spec.layout not in OWN_LUT or hasattr(ext, "dequant_lut")))


def _aligned_words(bits: torch.Tensor, spos: torch.Tensor, n_words: int) -> torch.Tensor:
    """bool [N, S] salient bits -> uint8 [N, 2·n_words]: bit p goes to aligned position spos[p]."""
    out = torch.zeros(bits.shape[0], 16 * n_words, dtype=torch.bool)
    out[:, spos.long()] = bits
    return pack_bits(out)


def _columns(plane: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """bool [N, len(cols)]: bits of the given columns of a [N, ceil(K/8)] plane (LSB first)."""
    return ((plane[:, cols // 8] >> (cols % 8).to(torch.uint8)) & 1).bool()


def _salient_bits(p: PackedLinear, name: str, cols: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """bool [N, len(cols)]: the bits of plane `name` at the given columns; binary_nm's compacted planes are
    expanded `rows` rows at a time ("keep": the occupancy plane's own bits)."""
    if p.spec.layout != "binary_nm" or name == KEEP:
        return _columns(p[name], cols)
    n, k = p.spec.out_features, p.spec.in_features
    parts = [expand_plane(p[name][r:r + rows], unpack_bits(p[KEEP][r:r + rows], k))[:, cols] for r in range(0, n, rows)]
    return torch.cat(parts) if parts else torch.zeros(0, len(cols), dtype=torch.bool)


def prepare(p: PackedLinear) -> dict:
    """Per-layer derived tensors (built once, cached on the module).

    Salient bits of sign1, group and sign2 are regrouped per block into 16-bit words (block t owns
    words woff[t]:woff[t+1]; salient column p of the block sits at bit spos[p] of that range), so the
    kernel's salient pass loads whole masks without per-lane limits. binary_nm: the same words from the
    expanded planes, plus the keep bits of the salient columns (kw); the planes themselves are passed as
    stored (compact sign1 / group [N, ceil(L/8)], keep [N, ceil(K/8)]).
    """
    spec, sc = p.spec, p.spec.scheme
    n, k, s, bs = spec.out_features, spec.in_features, spec.n_salient, spec.blocksize
    sal = unpack_bits(p["salient"], k) if sc.salient else torch.zeros(k, dtype=torch.bool)
    sidx = sal.nonzero()[:, 0]
    counts = torch.bincount(sidx // bs, minlength=spec.n_blocks)
    words = (counts + 15) // 16
    woff = torch.cat([torch.zeros(1, dtype=torch.long), words.cumsum(0)])
    first = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])[:-1]   # compact index of block start
    blk = sidx // bs
    spos = 16 * woff[blk] + torch.arange(s) - first[blk]
    n_words = int(woff[-1])
    empty = torch.zeros(0, dtype=torch.uint8)
    s1w = gw = s2w = torch.zeros(n, 0, dtype=torch.uint8)
    if sc.salient:
        s1w = _aligned_words(_salient_bits(p, "sign1", sidx), spos, n_words)
        s2w = _aligned_words(unpack_bits(p["sign2"], s), spos, n_words)
        if sc.cgb:
            gw = _aligned_words(_salient_bits(p, "group", sidx), spos, n_words)
    pos = torch.tensor(slot_positions(sc, ZERO_LANE), dtype=torch.int32)
    cs = full_col_scale(p).reshape(4, k).contiguous() if sc.rc else torch.zeros(0)
    tensors = [p["sign1"], p["group"] if sc.group else empty, s1w, gw, s2w,
               p["sign2"] if sc.salient else empty, woff.to(torch.int32), spos.to(torch.int32),
               sidx.to(torch.int32), p["values"], pos, cs]
    flags = [sc.rc, sc.group, sc.cgb, sc.salient]
    if spec.layout == "binary_nm":
        kw = _aligned_words(_salient_bits(p, KEEP, sidx), spos, n_words) if sc.salient else s1w
        tensors += [p[KEEP], kw, torch.tensor([spec.n, spec.m], dtype=torch.int32)]
        flags.append(True)
    vscale = float(p["values_scale"]) if "values_scale" in p.tensors else 1.0
    return dict(tensors=[t.contiguous() for t in tensors], vscale=vscale, flags=flags)


def prepare_lut(p: PackedLinear) -> dict:
    """The table-lookup kernel's tensors of one layer (built once, cached on the module): those of the
    binary_lut layout (arbq.packed.lut: codes [N16, KQ, 16], sign2 words [N16, S], values [N16, T, V, 16]),
    read in place from a binary_lut or binary_nm_lut layer, rearranged once from a "binary" or "binary_nm"
    one; plus the salient column indices, the first salient of each block, the slot lanes and the column
    scales fp32 [4, K]; N:M: the keep bytes [N16, ⌈K/8⌉, 16] (arbq.packed.nm_lut). Values that are not fp16
    are converted to fp32 (values_scale applied): the one copy a binary_lut layer gets."""
    p = _lookup_form(p)          # a "binary" / "binary_nm" layer's load-time copy in the lookup's layout
    layout = p.spec.layout
    q = nm_lut.as_lut(p) if layout == "binary_nm_lut" else p
    spec, sc = q.spec, q.spec.scheme
    k, bs = spec.in_features, spec.blocksize
    sidx = unpack_bits(q["salient"], k).nonzero()[:, 0]
    counts = torch.bincount(sidx // bs, minlength=spec.n_blocks)
    soff = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    vt = _kernel_values(q)
    pos = torch.tensor(slot_positions(sc, ZERO_LANE), dtype=torch.int32)
    cs = full_col_scale(q).reshape(4, k).contiguous() if sc.rc else torch.zeros(0)
    tensors = [q["codes"], q["sign2"], sidx.to(torch.int32), soff.to(torch.int32), vt.contiguous(), pos, cs]
    if layout == "binary_nm_lut":
        tensors.append(p[KEEP])
    return dict(tensors=tensors, flags=[sc.rc, sc.cgb])


def _kernel_values(p: PackedLinear) -> torch.Tensor:
    """The layer's values as the lookup kernels read them: fp16 as stored, any other dtype (or fp8 with its
    values_scale) decoded to fp32."""
    if p["values"].dtype == torch.float16 and "values_scale" not in p.tensors:
        return p["values"]
    return decode_scales(p.tensors, "values")


def _nm_expander(spec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """binary_nm's plane expansion (nm.binary_rows' `expand`) by the kernel's nm_expand, one pdep per 64 columns:
    11008 × 4096 in ~0.3 s instead of 1.3 in torch."""
    ext = extension()
    return lambda compact, keep: ext.nm_expand(compact.contiguous(), keep.contiguous(), spec.in_features, spec.n,
                                               spec.m)


def resident_form(p: PackedLinear, where: str = "linear") -> PackedLinear:
    """p as a process should hold it for this backend: a "binary" or "binary_nm" layer that the lookup GEMV runs
    (the default lane mode) in the layout the lookup reads in place — binary_lut (the same bits) or binary_nm_lut
    (2 code bits and 1 position bit per weight) — so that a loaded model keeps one copy, not the file's planes
    plus the lookup's load-time copy (prepare_lut); every other layer (and every layer in a lane mode that reads
    the stored planes) as it is."""
    if p.spec.layout not in ("binary", "binary_nm") or _mode() not in TABLE_BITS or not lut_supported(p):
        return p
    return _lookup_form(p, where)


def _lookup_form(p: PackedLinear, where: str = "linear") -> PackedLinear:
    """layouts.lookup_form with binary_nm's planes expanded by the kernel (nm_expand)."""
    return lookup_form(p, where, _nm_expander(p.spec) if p.spec.layout == "binary_nm" else None)


def lut_supported(p: PackedLinear) -> bool:
    """Whether the lookup GEMV runs this layer: grouped schemes with salient columns ("binary", "binary_lut"),
    and binary_nm / binary_nm_lut of such a scheme with column scales (RC: no means)."""
    sc = p.spec.scheme
    layout_ok = p.spec.layout in ("binary", *OWN_LUT) or (p.spec.layout == "binary_nm" and sc.rc)
    return layout_ok and lut.supports(sc, p.spec.blocksize) and hasattr(extension(), "gemv_lut")


def _lut(p: PackedLinear, cache: dict) -> dict:
    if "lut" not in cache:
        cache["lut"] = prepare_lut(p)
    return cache["lut"]


def dequantize_lut_t(p: PackedLinear, cache: dict, g0: int, g1: int, out: torch.Tensor) -> torch.Tensor:
    """Ŵᵀ of row groups g0:g1 (rows 16·g0 .. 16·g1, zero rows past N), [K, 16 (g1 − g0)] into `out` (fp32 or
    bf16, contiguous), from the lookup layout by the kernel (dequant_lut)."""
    c = _lut(p, cache)
    return extension().dequant_lut(c["tensors"], p.spec.in_features, p.spec.out_features, p.spec.blocksize,
                                   c["flags"], g0, g1, out)


def _mode() -> int:
    return LANE_MODES.get(os.environ.get("ARBQ_CPU_LANES", "lut"), LUT)


def dequantize(p: PackedLinear, cache: dict, r0: int, r1: int, mode: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0:r1 of Ŵ, fp32 [r1 - r0, K] (or bf16 into a bf16 `out`), by the kernel (mode 0: its scalar
    code), into `out` if given. binary_lut, binary_nm_lut: from dequantize_lut_t's columns (mode ignored)."""
    if p.spec.layout in OWN_LUT:
        g0, g1 = r0 // lut.LANES, -(-r1 // lut.LANES)
        dt = torch.float32 if out is None else out.dtype
        wt = dequantize_lut_t(p, cache, g0, g1, torch.empty(p.spec.in_features, lut.LANES * (g1 - g0), dtype=dt))
        w = wt.T[r0 - lut.LANES * g0:r1 - lut.LANES * g0]
        return w.contiguous() if out is None else out[:r1 - r0].copy_(w)
    if NAME not in cache:
        cache[NAME] = prepare(p)
    c = cache[NAME]
    buf = torch.empty(0) if out is None else out
    w = extension().dequant(c["tensors"], c["vscale"], p.spec.in_features, p.spec.blocksize, c["flags"], r0, r1,
                            _mode() if mode is None else mode, buf)
    return w[:r1 - r0]


def prefill_bf16(x: torch.Tensor) -> bool:
    """Whether a batched call (M >= BATCH_TILE) runs in bf16: x is bf16 (a model loaded in bf16), or
    ARBQ_CPU_PREFILL=bf16 asks for it with fp32 / fp16 activations (faster, rounded like a bf16 model)."""
    return x.dtype == torch.bfloat16 or os.environ.get("ARBQ_CPU_PREFILL", "auto") == "bf16"


_scratch = threading.local()      # one bf16 scratch panel per thread, shared by every layer


def _panel_buffer(rows: int, k: int) -> torch.Tensor:
    """A reused bf16 [rows, k] buffer of the calling thread (grown when a larger one is needed; never one
    per layer, and never shared between threads that run models at the same time)."""
    buf = getattr(_scratch, "panel", None)
    if buf is None or buf.numel() < rows * k:
        buf = _scratch.panel = torch.empty(rows * k, dtype=torch.bfloat16)
    return buf[:rows * k].view(rows, k)


def matmul_bf16(p: PackedLinear, x: torch.Tensor, cache: dict, mode: int) -> torch.Tensor:
    """y [M, N] bf16 = bf16(x) [M, K] @ bf16(Ŵ)ᵀ with fp32 accumulation (oneDNN; AMX where the CPU has it).

    Ŵ is dequantized by the kernel into bf16 panels of PANEL_BYTES (each value rounded to nearest even from
    the fp32 dequantization) and multiplied panel by panel: yᵀ[r0:r1] = Ŵ[r0:r1] @ xᵀ, so each panel's
    output rows are contiguous."""
    n, k = p.spec.out_features, p.spec.in_features
    rows = max(16, min(n, PANEL_BYTES // (2 * k)))
    if p.spec.layout in OWN_LUT:
        return _matmul_lut(p, x.to(torch.bfloat16).contiguous(), cache, torch.bfloat16, rows // lut.LANES)
    xt = x.to(torch.bfloat16).T
    buf = _panel_buffer(rows, k)
    yt = torch.empty(n, x.shape[0], dtype=torch.bfloat16)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        torch.matmul(dequantize(p, cache, r0, r1, mode, buf), xt, out=yt[r0:r1])
    return yt.T


def _matmul_lut(p: PackedLinear, x: torch.Tensor, cache: dict, dtype: torch.dtype, groups: int) -> torch.Tensor:
    """y [M, N] = x @ Ŵᵀ for binary_lut, batched: Ŵᵀ panels [K, 16·groups] (dequantize_lut_t) in `dtype`
    and y[:, panel rows] = x @ panel (the panel as the matmul's plain right operand); x [M, K] in dtype."""
    n, k, n16 = p.spec.out_features, p.spec.in_features, -(-p.spec.out_features // lut.LANES)
    groups = max(1, min(groups, n16))
    buf = _panel_buffer(lut.LANES * groups, k) if dtype == torch.bfloat16 else \
        torch.empty(lut.LANES * groups * k, dtype=dtype)
    y = torch.empty(x.shape[0], n, dtype=dtype)
    part = torch.empty(x.shape[0], lut.LANES * groups, dtype=dtype)
    for g0 in range(0, n16, groups):
        g1 = min(g0 + groups, n16)
        r0, r1 = lut.LANES * g0, min(lut.LANES * g1, n)
        wt = dequantize_lut_t(p, cache, g0, g1, buf.view(-1)[:k * lut.LANES * (g1 - g0)].view(k, -1))
        yp = torch.matmul(x, wt, out=part[:, :lut.LANES * (g1 - g0)]) if g1 - g0 == groups else torch.matmul(x, wt)
        y[:, r0:r1] = yp[:, :r1 - r0]
    return y


GEMV_KINDS = {"gemv": 0, "gemv_lut": 1, "gemv_sign": 2}     # the kernel's batch-1 ops (DecodeCall's `kind`)


def _gemv_args(p: PackedLinear, cache: dict, mode: int) -> tuple[str, list, float, list, int]:
    """The batch-1 GEMV of this layer in lane mode `mode`: (op, tensors, vscale, flags, table_bits) with op a
    GEMV_KINDS name: gemv_lut (the lookup of grouped schemes) or gemv_sign (the sign scheme's lookup) with
    table_bits 16 or 32, or gemv (masked adds, which also takes `mode`) with table_bits 0."""
    if p.spec.layout in OWN_LUT or (mode in TABLE_BITS and ("lut" in cache or lut_supported(p))):
        c = _lut(p, cache)
        return "gemv_lut", c["tensors"], 1.0, c["flags"], TABLE_BITS.get(mode, 32)
    if mode in TABLE_BITS and ("sign" in cache or sign_supported(p)):
        if "sign" not in cache:
            cache["sign"] = prepare_sign(p)
        return "gemv_sign", cache["sign"], 1.0, [], TABLE_BITS.get(mode, 32)
    if NAME not in cache:
        cache[NAME] = prepare(p)
    c = cache[NAME]
    return "gemv", c["tensors"], c["vscale"], c["flags"], 0


def sign_supported(p: PackedLinear) -> bool:
    """Whether the sign scheme's lookup (gemv_sign) runs this layer: the binary layout of a scheme with neither
    group bits, salient columns nor column scales (sign), block size a multiple of 32."""
    sc = p.spec.scheme
    return (p.spec.layout == "binary" and not (sc.group or sc.salient or sc.rc) and p.spec.blocksize % 32 == 0
            and hasattr(extension(), "gemv_sign"))


def prepare_sign(p: PackedLinear) -> list[torch.Tensor]:
    """gemv_sign's tensors: the layer's own sign plane [N, ⌈K/8⌉] (read in place), its values [N, T, V] with
    rows last, padded to whole row groups [N16, T, V, 16] (fp16 kept, else fp32 with values_scale applied; a
    copy of 2 values per row and block), and the value lanes of α and μ (int32 [2])."""
    spec = p.spec
    vt = lut.rows_last(_kernel_values(p), -(-spec.out_features // lut.LANES)).contiguous()
    pos = slot_positions(spec.scheme, ZERO_LANE)
    lanes = torch.tensor([pos[KERNEL_SLOTS.index(("alpha", 0, 0, 0))], pos[KERNEL_SLOTS.index(("mu", 0, 0))]],
                         dtype=torch.int32)
    return [p["sign1"].contiguous(), vt, lanes]


def bind(p: PackedLinear, x: torch.Tensor, cache: dict, bias: torch.Tensor | None, watch: list[torch.Tensor],
         env: list[str]):
    """The layer's decode GEMV bound once for BinaryLinear's fast path (the kernel's DecodeCall), or None where
    x is not a decode call (M >= BATCH_TILE) or the kernel is missing. call(x) gives y [..., N] in x's dtype
    (+ bias) as matmul would, or None once a tensor in `watch` changed in place, ENV or a variable in `env`
    changed, or x does not fit the binding (device, width, rows, dtype): the caller then takes its general path.
    """
    ext = extension()
    if ext is None or not hasattr(ext, "DecodeCall") or x.reshape(-1, p.spec.in_features).shape[0] >= BATCH_TILE:
        return None
    mode = _mode()
    op, tensors, vscale, flags, table_bits = _gemv_args(p, cache, mode)
    return ext.DecodeCall(GEMV_KINDS[op], tensors, vscale, p.spec.in_features, p.spec.out_features,
                          p.spec.blocksize, flags, table_bits, mode, bias, watch, [*ENV, *env], BATCH_TILE - 1)


def matmul(p: PackedLinear, x: torch.Tensor, cache: dict, mode: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ Ŵᵀ (fp32, or bf16 from the bf16 prefill path). mode (LANE_MODES): 0 scalar
    C++, 1 fp32 lanes, 2 fp16 lanes where safe, 3 table lookup with int16 tables, 4 with fp32 tables (grouped
    schemes; otherwise as 1).

    M < BATCH_TILE: GEMV from the bits, one x row at a time, in fp32. Otherwise Ŵ is dequantized a panel
    at a time and multiplied with torch.matmul: in bf16 (matmul_bf16) when prefill_bf16(x), else in fp32,
    TILE_ROWS rows at a time into one reused buffer (small enough to stay in cache).
    """
    ext, mode = extension(), _mode() if mode is None else mode
    if x.shape[0] >= BATCH_TILE and prefill_bf16(x):
        return matmul_bf16(p, x, cache, mode)
    x = x.float().contiguous()
    is_lut = p.spec.layout in OWN_LUT
    if x.shape[0] < BATCH_TILE:
        op, tensors, vscale, flags, table_bits = _gemv_args(p, cache, mode)
        if op == "gemv_lut":
            return ext.gemv_lut(x, tensors, p.spec.out_features, p.spec.blocksize, flags, table_bits)
        if op == "gemv_sign":
            return ext.gemv_sign(x, tensors, p.spec.out_features, p.spec.blocksize, table_bits)
        return ext.gemv(x, tensors, vscale, p.spec.blocksize, flags, mode)
    n, k = p.spec.out_features, p.spec.in_features
    if is_lut:
        return _matmul_lut(p, x, cache, torch.float32, TILE_ROWS // lut.LANES)
    y = torch.empty(x.shape[0], n)
    buf = torch.empty(min(TILE_ROWS, n), k)
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, n)
        torch.matmul(x, dequantize(p, cache, r0, r1, mode, buf).T, out=y[:, r0:r1])
    return y
