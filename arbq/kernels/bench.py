"""Packed vs dense matmul timing on one shape at a time (used by `make bench`; not a test).

Protocol: same process and threads (recorded); a correctness check before any timing; warm-up; A/B
interleaved (the order alternates every repeat); median with p10/p90 of >= 21 repeats; dense outputs
preallocated; kernel build and layer preparation excluded. "hot" reuses one weight; "cold" rotates
copies of the weights larger than the last-level cache. A batch-1 repeat is a chain of back-to-back calls
(cold: every copy once; hot: HOT_CHAIN calls) timed together, the per-call time being the chain's over its
length, as in a decode, where linears follow each other: a single call after the other side's op also
paid the OpenMP workers' wake-up from sleep (measured on a 2-vCPU VM: sign 11008×4096 cold 0.52 ms per call
back to back, 0.98 ms after a dense matmul, 0.63 ms with OMP_WAIT_POLICY=ACTIVE). Batches ≥ 8 time one call
per repeat. The honest bits per weight are reported next to every speedup: the batch-1 ceiling vs fp32 is
32 / bits. `nm="6:8"` times the "binary_nm" layout (arbq.packed.nm: the method's binary scheme on n of every
m weights, random positions) instead.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from arbq.kernels.cpu import BATCH_TILE
from arbq.methods.nm import nm_mask
from arbq.methods.registry import scheme_for
from arbq.methods.result import LinearResult
from arbq.packed import nm as nm_layout
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.codec import PackedLinear, pack_linear
from arbq.packed.layouts import lookup_form


def random_result(n: int, k: int, method: str, cgb: bool, blocksize: int = 128, salient_frac: float = 0.08,
                  seed: int = 0) -> LinearResult:
    """A LinearResult with random bits and scales in the slots `method` uses (timing needs no real fit)."""
    g = torch.Generator().manual_seed(seed)
    sc = scheme_for(method, cgb)
    t = -(-k // blocksize)
    sal = torch.zeros(k, dtype=torch.bool)
    if sc.salient:
        sal[torch.randperm(k, generator=g)[:round(salient_frac * k)]] = True
    group = (torch.rand(n, k, generator=g) < 0.5) if sc.group else torch.zeros(n, k, dtype=torch.bool)
    group &= sal.logical_not() | sc.cgb
    return LinearResult(
        sign1=torch.rand(n, k, generator=g) < 0.5, sign2=torch.rand(n, k, generator=g) < 0.5, group=group,
        salient=sal, alpha=torch.rand(n, t, 2, 2, 2, generator=g) * 0.02,
        mu=torch.zeros(n, t, 2, 2) if sc.rc else torch.randn(n, t, 2, 2, generator=g) * 1e-3,
        col_scale=torch.rand(2, 2, k, generator=g) + 0.5 if sc.rc else torch.ones(2, 2, k), blocksize=blocksize)


def random_keep(n: int, k: int, kept: int, m: int, seed: int = 0) -> torch.Tensor:
    """bool [n, k]: `kept` random positions of every run of m columns (min(kept, r) in a last run of r): the
    N:M mask (arbq.methods.nm.nm_mask) of uniform random scores."""
    return nm_mask(torch.rand(n, k, generator=torch.Generator().manual_seed(seed)), kept, m)


def random_packed(n: int, k: int, method: str, cgb: bool, scale_dtype: str = "fp16", nm: str | None = None,
                  blocksize: int = 128, seed: int = 0, interleave: bool = False) -> PackedLinear:
    """random_result packed in the method's "binary" layout, or with nm = "N:M" in "binary_nm" (random N:M
    positions, the same binary scheme on the kept weights); interleave: in the lookup kernel's own layout
    (arbq.packed.layouts.lookup_form: binary_lut, binary_nm_lut)."""
    res = random_result(n, k, method, cgb, blocksize, seed=seed)
    if nm is None:
        p = pack_linear(res, scheme_for(method, cgb), scale_dtype)
        return lookup_form(p) if interleave else p
    kept, m = (int(v) for v in nm.split(":"))
    sc = scheme_for(method, cgb)
    params = {"rc": sc.rc, "salient": sc.salient, "group": sc.group, "cgb": sc.cgb, "blocksize": blocksize,
              "n": kept, "m": m}
    keep = random_keep(n, k, kept, m, seed + 1)
    p = nm_layout.pack(nm_layout.NMResult(res, keep, kept, m), params, scale_dtype)
    return lookup_form(p) if interleave else p


def stats(ts: list[float]) -> dict:
    """Median, p10 and p90 in ms of timings in seconds."""
    q = statistics.quantiles(ts, n=10)
    return {"median_ms": 1e3 * statistics.median(ts), "p10_ms": 1e3 * q[0], "p90_ms": 1e3 * q[-1]}


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
Op = Callable[[int], object]           # op(r): one timed call at repeat r
HOT_CHAIN = 8                          # batch-1 hot: calls per timed repeat


def chained(call: Callable[[int], object], length: int) -> Op:
    """op(r) = call(r·length + i) for i < length, back to back: one timed repeat of `length` calls (per-call
    time = the repeat's / length; with `length` = the number of cold copies every copy is called once)."""
    def op(r: int) -> None:
        for i in range(length):
            call(r * length + i)
    return op


def clock_timer(now: Callable[[], float]) -> Callable[[Op, int], float]:
    def timed(op: Op, r: int) -> float:
        t0 = now()
        op(r)
        return now() - t0
    return timed


def cuda_timer(op: Op, r: int) -> float:
    """Seconds of op(r) on the current CUDA stream, by CUDA events."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    op(r)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / 1e3


def interleaved(ops: tuple[Op, Op], repeats: int, warmup: int, timer: Callable[[Op, int], float]
                ) -> tuple[dict, dict]:
    """The protocol: `warmup` untimed calls of each, then A/B interleaved repeats (the order alternates every
    repeat); (stats of ops[0], stats of ops[1])."""
    for r in range(warmup):
        ops[0](r), ops[1](r)
    ts: tuple[list, list] = ([], [])
    for r in range(repeats):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            ts[i].append(timer(ops[i], r))
    return stats(ts[0]), stats(ts[1])


def bench_shape(n: int, k: int, method: str = "rc", cgb: bool = True, scale_dtype: str = "fp16",
                batches: tuple[int, ...] = (1, 128), repeats: int = 21, warmup: int = 5, backend: str = "cpu",
                cold: bool = False, llc_bytes: int = 3 * 2**29, clock: str = "wall", lanes: str = "lut",
                seed: int = 0, nm: str | None = None, bf16: bool = False, interleave: bool = False) -> dict:
    """Time x [b, K] @ Wᵀ, dense fp32 torch.matmul vs BinaryLinear, for each batch b; returns a dict.

    clock "thread" (CPU time of the calling thread) is immune to other processes on a shared machine
    but only meaningful with torch.set_num_threads(1). lanes: ARBQ_CPU_LANES for the cpu backend (binary_nm
    of a scheme without column scales has no table lookup: lut runs its fp32 masked-add kernel). nm: "N:M"
    times the binary_nm layout.
    bf16: also time dense bf16 (weights and x in bf16) against the packed layer, a second A/B pair.
    interleave: time the "binary_lut" layout (the lookup kernel's own bytes) instead of "binary".
    """
    now = CLOCKS[clock]
    old_lanes = os.environ.get("ARBQ_CPU_LANES")
    os.environ["ARBQ_CPU_LANES"] = lanes
    try:
        return _bench(n, k, method, cgb, scale_dtype, batches, repeats, warmup, backend, cold, llc_bytes, now,
                      seed, nm, extra={"clock": clock, "lanes": lanes, "bf16": bf16, "interleave": interleave})
    finally:
        if old_lanes is None:
            os.environ.pop("ARBQ_CPU_LANES", None)
        else:
            os.environ["ARBQ_CPU_LANES"] = old_lanes


def _bench(n, k, method, cgb, scale_dtype, batches, repeats, warmup, backend, cold, llc_bytes, now, seed, nm,
           extra: dict) -> dict:
    packed = random_packed(n, k, method, cgb, scale_dtype, nm, seed=seed, interleave=extra.get("interleave", False))
    bits = sum(packed.spec.formula_bits().values()) / (n * k)
    w = BinaryLinear.from_packed(packed).dequantize()   # the packed weights (scales as stored)
    copies = max(1, math.ceil(llc_bytes / w.numel() / 4)) if cold else 1
    dense = [w.clone() for _ in range(copies)]
    layers = [BinaryLinear.from_packed(PackedLinear(packed.spec, {key: t.clone() for key, t in packed.tensors.items()}),
                                       backend=backend) for _ in range(copies)]
    out = {"shape": [n, k], "method": method, "cgb": cgb, "nm": nm, "layout": packed.spec.layout,
           "scale_dtype": scale_dtype, "backend": backend,
           "threads": torch.get_num_threads(), **extra, "mode": "cold" if cold else "hot",
           "bits_per_weight": bits,
           "ceiling_vs_fp32": 32 / bits, "batches": {}}
    dense16 = [t.to(torch.bfloat16) for t in dense] if extra.get("bf16") else []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, k, generator=torch.Generator().manual_seed(seed + b))
            buf = torch.empty(b, n)
            want = x @ w.T
            err = float((layers[0](x) - want).abs().max() / want.abs().max())
            if err > {"fp16": 5e-3, "lut": 1e-3}.get(extra["lanes"], 1e-4):
                raise RuntimeError(f"packed output differs from dense by {err:.2e} (relative): not timing it")
            chain = (copies if cold else HOT_CHAIN) if b < BATCH_TILE else 1      # decode calls only
            warm = max(warmup, -(-copies // chain))       # every copy at least once: preparation is not timed
            ops = (chained(lambda r, x=x, buf=buf: torch.matmul(x, dense[r % copies].T, out=buf), chain),
                   chained(lambda r, x=x: layers[r % copies](x), chain))
            d, p = (_per_call(t, chain) for t in interleaved(ops, repeats, warm, clock_timer(now)))
            row = {"dense_fp32": d, "packed": p, "max_rel_err": err, "speedup": d["median_ms"] / p["median_ms"],
                   "chain": chain}
            if extra.get("bf16"):      # what users run dense models in: bf16 weights and inputs (oneDNN, AMX)
                # the packed layer gets the same bf16 x (a model loaded in bf16): batch 1 runs the fp32 kernel,
                # batches >= BATCH_TILE the bf16 prefill path (bf16 panels, bf16 matmul)
                x16, buf16 = x.to(torch.bfloat16), torch.empty(b, n, dtype=torch.bfloat16)
                want16 = x16.float() @ dense16[0].float().T
                err16 = float((layers[0](x16).float() - want16).abs().max() / want16.abs().max())
                if err16 > 1e-2:
                    raise RuntimeError(f"packed bf16 output differs from dense bf16 by {err16:.2e}: not timing it")
                ops16 = (chained(lambda r, buf16=buf16, x16=x16, w16=dense16: torch.matmul(x16, w16[r % copies].T,
                                                                                           out=buf16), chain),
                         chained(lambda r, x16=x16: layers[r % copies](x16), chain))
                d16, p16 = (_per_call(t, chain) for t in interleaved(ops16, repeats, warm, clock_timer(now)))
                row.update(dense_bf16=d16, packed_vs_bf16=p16, speedup_vs_bf16=d16["median_ms"] / p16["median_ms"],
                           packed_bf16_vs_fp32=d["median_ms"] / p16["median_ms"], max_rel_err_bf16=err16)
            out["batches"][str(b)] = row
    return out


def _per_call(st: dict, chain: int) -> dict:
    """stats of chained repeats -> per-call stats (every figure over the chain's length)."""
    return {key: v / chain for key, v in st.items()}


def bench(shapes=((4096, 4096), (11008, 4096)), **kw) -> list[dict]:
    return [bench_shape(n, k, **kw) for n, k in shapes]


if __name__ == "__main__":
    print(json.dumps(bench(), indent=2))
