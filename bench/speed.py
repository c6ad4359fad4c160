"""Kernel timings (packed BinaryLinear vs dense matmul) and end-to-end greedy decode speed.

CPU: `arbq.kernels.bench.bench_shape` (dense fp32 vs packed, A/B interleaved, correctness check
first, medians with p10/p90; spec/packing.md §4). CUDA: the same protocol here with CUDA events,
dense bf16. Every row carries the honest bits per weight of the timed layer, whose batch-1 ceiling
vs fp32 is 32 / bits (16 / bits vs bf16).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def _rows(raw: dict) -> dict:
    """bench_shape's per-batch dict -> {batchB: {dense_*_ms, packed_*_ms, speedup_vs_dense, ...}}."""
    out = {}
    for b, r in raw["batches"].items():
        dense = r.get("dense_fp32") or r["dense"]
        row = {f"dense_{k}": v for k, v in dense.items()}
        row.update({f"packed_{k}": v for k, v in r["packed"].items()})
        row.update(speedup_vs_dense=r["speedup"], max_rel_err=r["max_rel_err"])
        if "dense_bf16" in r:
            row.update({f"dense_bf16_{k}": v for k, v in r["dense_bf16"].items()})
            row.update({f"packed_bf16_{k}": v for k, v in r["packed_vs_bf16"].items()})
            row.update(speedup_vs_bf16=r["speedup_vs_bf16"], packed_bf16_vs_fp32=r.get("packed_bf16_vs_fp32"))
        out[f"batch{b}"] = row
    return out


def _gpu_shape(n: int, k: int, method: str, cgb: bool, batches, repeats: int, warmup: int, device: str,
               nm: str | None = None) -> dict:
    """bench_shape's protocol on CUDA: dense bf16 matmul vs BinaryLinear, CUDA-event timings."""
    from arbq.kernels.bench import cuda_timer, interleaved, random_packed
    from arbq.packed.binary_linear import BinaryLinear

    packed = random_packed(n, k, method, cgb, "fp16", nm)
    bits = sum(packed.spec.formula_bits().values()) / (n * k)
    layer = BinaryLinear.from_packed(packed)
    w = layer.dequantize().to(device)
    layer = layer.to(device)
    wb = w.to(torch.bfloat16)
    out = {"shape": [n, k], "bits_per_weight": bits, "ceiling_vs_fp32": 32 / bits, "batches": {}}
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, k, device=device)
            xb, buf = x.to(torch.bfloat16), torch.empty(b, n, device=device, dtype=torch.bfloat16)
            want = x @ w.T
            err = float((layer(x) - want).abs().max() / want.abs().max())
            if err > 5e-3:
                raise RuntimeError(f"packed output differs from dense by {err:.2e}: not timing it")
            ops = (lambda r, xb=xb, buf=buf: torch.matmul(xb, wb.T, out=buf), lambda r, x=x: layer(x))
            d, p = interleaved(ops, repeats, warmup, cuda_timer)
            out["batches"][str(b)] = {"dense": d, "packed": p, "max_rel_err": err,
                                      "speedup": d["median_ms"] / p["median_ms"]}
    return out


def kernel_layout(name: str) -> dict:
    """A bench method name (bench.methods.METHODS) -> bench_shape's {method, cgb, nm, interleave} for its packed
    layout: N:M methods (pbs2p-6of8, stbllm-5of8, ...) -> their binary strategy (nm_base), cgb and "N:M"
    (binary_nm); "NAME/lut" -> NAME's binary layout interleaved (binary_lut, `arbq pack --interleave`); others
    -> name without "+cgb", cgb = the suffix (the binary layout)."""
    from arbq.methods.registry import get_method
    from bench.methods import METHODS, RunSpec

    if name.endswith("/lut"):
        return {**kernel_layout(name.removesuffix("/lut")), "interleave": True}
    if name in METHODS:
        cfg = RunSpec(name, *METHODS[name]).config()
        rec = get_method(cfg.method)
        if rec.layout == "binary_nm":
            return {"method": cfg.nm_base, "cgb": bool(rec.layout_params(cfg)["cgb"]), "nm": cfg.nm,
                    "interleave": False}
    return {"method": name.removesuffix("+cgb"), "cgb": name.endswith("+cgb"), "nm": None, "interleave": False}


def kernels(shapes, device: str = "cpu", batches=(1, 128), repeats: int = 21, warmup: int = 5,
            cold: bool = True, clock: str = "wall", method: str = "rc", cgb: bool = True, nm: str | None = None,
            label: str | None = None, interleave: bool = False) -> dict:
    """kernels/NxK/... rows for every shape (rc+cgb layout by default, fp16 scales, random bits); nm = "N:M":
    the binary_nm layout of that scheme; label: the row's method name (default method[+cgb][ N:M])."""
    from arbq.kernels import bench as kb

    cuda = device.startswith("cuda")
    name = label or f"{method}{'+cgb' if cgb else ''}{f' {nm}' if nm else ''}"
    out: dict = {"method": name, "layout": ("binary_nm" if nm else "binary") + ("_lut" if interleave else ""), "nm": nm,
                 "scale_dtype": "fp16", "device": device,
                 "dense_dtype": "bf16" if cuda else "fp32", "threads": torch.get_num_threads(),
                 "clock": "cuda events" if cuda else clock, "repeats": repeats, "warmup": warmup,
                 "hot_chain": None if cuda else kb.HOT_CHAIN, "backend": _backend(device)}
    for n, k in shapes:
        key = f"{n}x{k}"
        if cuda:
            raw = _gpu_shape(n, k, method, cgb, batches, repeats, warmup, device, nm)
        else:
            raw = kb.bench_shape(n, k, method, cgb, batches=tuple(batches), repeats=repeats, warmup=warmup,
                                 clock=clock, nm=nm, bf16=True, interleave=interleave)
        row = {"bits_per_weight": raw["bits_per_weight"], "ceiling_vs_fp32": raw["ceiling_vs_fp32"],
               **_rows(raw)}
        if cold and not cuda:  # every shape also cold (rotating copies), as a decode through many layers sees it
            raw_c = kb.bench_shape(n, k, method, cgb, batches=tuple(batches), repeats=repeats, warmup=warmup,
                                   clock=clock, cold=True, nm=nm, interleave=interleave)
            for b, r in _rows(raw_c).items():
                row[b]["cold"] = r
        out[key] = row
    return out


def _backend(device: str) -> str:
    if device.startswith("cuda"):
        from arbq.kernels import triton_gpu

        return "triton" if triton_gpu.triton is not None else "torch fallback (Triton not installed)"
    from arbq.kernels import cpu

    ext = cpu.extension()
    # features: the compiled paths, e.g. avx512+fp16+bf16+lut16 (+lut16: batch-1 lookups with int16 tables)
    return f"cpu (C++ kernel: {ext.features()})" if ext is not None else "torch fallback (C++ kernel did not build)"


class _Clock:
    """A logits processor that timestamps every generated token (scores pass through unchanged)."""

    def __init__(self, cuda: bool):
        self.cuda, self.t = cuda, []

    def __call__(self, input_ids, scores):
        if self.cuda:
            torch.cuda.synchronize()
        self.t.append(time.perf_counter())
        return scores


def decode(packed_dir: Path, model_dir: Path, device: str = "cpu", new_tokens: int = 32, repeats: int = 5,
           prompt: str = "It was a fine spring morning when I first arrived in the town, and") -> dict:
    """Greedy decode speed, packed model (arbq.packed.load) vs the dense model, A/B interleaved.

    Per run: prefill_ms = prompt + first token; decode tokens/s = (new_tokens − 1) / time from the first
    to the last token (KV cache on). Medians over `repeats` runs after one warm-up run each."""
    from transformers import LogitsProcessorList

    from arbq.models.loading import load_model, load_tokenizer, resolve
    from arbq.packed import load

    cuda = device.startswith("cuda")
    dense_dtype = torch.bfloat16 if cuda else torch.float32
    tok = load_tokenizer(resolve(str(model_dir)))
    nets = {"dense": load_model(resolve(str(model_dir)), dtype=dense_dtype)[0].to(device),
            "packed": load(packed_dir, device=device)}
    enc = tok(prompt, return_tensors="pt").to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(name: str) -> tuple[float, float, str]:
        clock = _Clock(cuda)
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = nets[name].generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, use_cache=True, pad_token_id=pad,
                                      logits_processor=LogitsProcessorList([clock]))
        text = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return 1e3 * (clock.t[0] - t0), (new_tokens - 1) / (clock.t[-1] - clock.t[0]), text

    texts = {name: run(name)[2] for name in nets}  # warm-up
    times: dict[str, list] = {name: [] for name in nets}
    for r in range(repeats):
        for name in (("dense", "packed") if r % 2 == 0 else ("packed", "dense")):
            times[name].append(run(name)[:2])
    out = {"packed_dir": str(packed_dir), "model": str(model_dir), "device": device, "prompt": prompt,
           "prompt_tokens": int(enc["input_ids"].shape[1]), "new_tokens": new_tokens, "repeats": repeats,
           "dense_dtype": str(dense_dtype).removeprefix("torch."), "threads": torch.get_num_threads()}
    for name, ts in times.items():
        out[f"{name}_prefill_ms"] = statistics.median(t[0] for t in ts)
        out[f"{name}_tokens_per_s"] = statistics.median(t[1] for t in ts)
        out[f"{name}_text"] = texts[name]
    out["speedup_vs_dense"] = out["packed_tokens_per_s"] / out["dense_tokens_per_s"]
    return out
