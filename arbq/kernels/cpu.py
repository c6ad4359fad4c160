"""CPU backend: a C++ kernel (binary_gemv.cpp) built on first use, GEMV straight from the bits.

Built with torch.utils.cpp_extension.load (-O3 -march=native, OpenMP) into TORCH_EXTENSIONS_DIR under a
name that includes a hash of the CPU's feature flags, so a cache shared between machines never runs
code compiled for another CPU. If the build fails (no compiler, no ninja) the backend reports itself
unsupported and BinaryLinear falls back to the torch backend.

Batch M < BATCH_TILE: the kernel loops over x rows (memory-bound decode). M >= BATCH_TILE: rows of Ŵ
are dequantized TILE_ROWS at a time by the kernel and multiplied with torch.matmul (compute-bound
prefill).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

from arbq.packed.codec import PackedLinear, full_col_scale
from arbq.packed.format import pack_bits, unpack_bits

NAME = "cpu"
BATCH_TILE = 8
TILE_ROWS = 256
SOURCE = Path(__file__).with_name("binary_gemv.cpp")
# kernel slot order of binary_gemv.cpp: alpha (kind, group, order), then mu (kind, group)
KERNEL_SLOTS = (("alpha", 0, 0, 0), ("alpha", 0, 1, 0), ("alpha", 1, 0, 0), ("alpha", 1, 1, 0),
                ("alpha", 1, 0, 1), ("alpha", 1, 1, 1), ("mu", 0, 0), ("mu", 0, 1), ("mu", 1, 0), ("mu", 1, 1))
ZERO_LANE = 15
# ARBQ_CPU_LANES: precision of the GEMV's first pass. fp32 (default) matches the torch backend to ~1e-6;
# fp16 (AVX512-FP16 CPUs) is faster, ~1e-3 relative error per linear, and falls back to fp32 where x is large.
LANE_MODES = {"scalar": 0, "fp32": 1, "fp16": 2}

_ext = None


def _cpu_tag() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def extension():
    """The compiled module, or None if it cannot be built here (the reason is warned once)."""
    global _ext
    if _ext is None:
        try:
            from torch.utils.cpp_extension import _get_build_directory, load

            name = f"arbq_binary_gemv_{_cpu_tag()}"
            if not any(Path(_get_build_directory(name, False)).glob("*.so")):
                print("arbq: building the CPU kernel (once per machine, about a minute)...", file=sys.stderr)
            _ext = load(name=name, sources=[str(SOURCE)],
                        extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                        verbose=bool(os.environ.get("ARBQ_VERBOSE_BUILD")))
        except Exception as e:  # any build failure means: use the torch backend
            warnings.warn(f"arbq: C++ kernel unavailable, using torch fallback ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''})", stacklevel=2)
            _ext = False
    return _ext or None


def supports(p: PackedLinear, x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and p["sign1"].device.type == "cpu" and extension() is not None


def _aligned_words(bits: torch.Tensor, spos: torch.Tensor, n_words: int) -> torch.Tensor:
    """bool [N, S] salient bits -> uint8 [N, 2·n_words]: bit p goes to aligned position spos[p]."""
    out = torch.zeros(bits.shape[0], 16 * n_words, dtype=torch.bool)
    out[:, spos.long()] = bits
    return pack_bits(out)


def _columns(plane: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """bool [N, len(cols)]: bits of the given columns of a [N, ceil(K/8)] plane (LSB first)."""
    return ((plane[:, cols // 8] >> (cols % 8).to(torch.uint8)) & 1).bool()


def prepare(p: PackedLinear) -> dict:
    """Per-layer derived tensors (built once, cached on the module).

    Salient bits of sign1, group and sign2 are regrouped per block into 16-bit words (block t owns
    words woff[t]:woff[t+1]; salient column p of the block sits at bit spos[p] of that range), so the
    kernel's salient pass loads whole masks without per-lane limits.
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
        s1w = _aligned_words(_columns(p["sign1"], sidx), spos, n_words)
        s2w = _aligned_words(unpack_bits(p["sign2"], s), spos, n_words)
        if sc.cgb:
            gw = _aligned_words(_columns(p["group"], sidx), spos, n_words)
    names = [("alpha", *a) for a in sc.alpha_slots] + [("mu", *m) for m in sc.mu_slots]
    pos = torch.tensor([names.index(s_) if s_ in names else ZERO_LANE for s_ in KERNEL_SLOTS], dtype=torch.int32)
    cs = full_col_scale(p).reshape(4, k).contiguous() if sc.rc else torch.zeros(0)
    tensors = [p["sign1"], p["group"] if sc.group else empty, s1w, gw, s2w,
               p["sign2"] if sc.salient else empty, woff.to(torch.int32), spos.to(torch.int32),
               sidx.to(torch.int32), p["values"], pos, cs]
    vscale = float(p["values_scale"]) if "values_scale" in p.tensors else 1.0
    return dict(tensors=[t.contiguous() for t in tensors], vscale=vscale,
                flags=[sc.rc, sc.group, sc.cgb, sc.salient])


def _mode() -> int:
    return LANE_MODES.get(os.environ.get("ARBQ_CPU_LANES", "fp32"), 1)


def dequantize(p: PackedLinear, cache: dict, r0: int, r1: int, mode: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0:r1 of Ŵ, fp32 [r1 - r0, K], by the kernel (mode 0: its scalar code), into `out` if given."""
    if NAME not in cache:
        cache[NAME] = prepare(p)
    c = cache[NAME]
    buf = torch.empty(0) if out is None else out
    w = extension().dequant(c["tensors"], c["vscale"], p.spec.in_features, p.spec.blocksize, c["flags"], r0, r1,
                            _mode() if mode is None else mode, buf)
    return w[:r1 - r0]


def matmul(p: PackedLinear, x: torch.Tensor, cache: dict, mode: int | None = None) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] @ Ŵᵀ. mode: 0 scalar C++, 1 fp32 lanes, 2 fp16 lanes where safe.

    M < BATCH_TILE: GEMV from the bits, one x row at a time. Otherwise Ŵ is dequantized TILE_ROWS rows
    at a time into one reused buffer (small enough to stay in cache) and multiplied with torch.matmul.
    """
    if NAME not in cache:
        cache[NAME] = prepare(p)
    c, ext = cache[NAME], extension()
    x = x.float().contiguous()
    if x.shape[0] < BATCH_TILE:
        return ext.gemv(x, c["tensors"], c["vscale"], p.spec.blocksize, c["flags"], _mode() if mode is None else mode)
    n, k = p.spec.out_features, p.spec.in_features
    y = torch.empty(x.shape[0], n)
    buf = torch.empty(min(TILE_ROWS, n), k)
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, n)
        torch.matmul(x, dequantize(p, cache, r0, r1, mode, buf).T, out=y[:, r0:r1])
    return y
