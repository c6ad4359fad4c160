"""End-to-end decode and memory on a model with 4096-class layers: packed (every layout the methods write)
vs dense fp32 and bf16. A bench table, not a timed test (`python -m bench.e2e`, and `make bench` step 5).

The model: `synthetic_llama` writes a Llama-architecture HF checkpoint with random weights (default the
Llama-2-7B layer shapes — hidden 4096, intermediate 11008, 32 heads, vocab 32000, untied lm_head — with
2 decoder layers), N(0, 0.02) weights and unit RMSNorm weights in bf16 on disk. No tokenizer: prompts are
random token ids. It is not a trained model; its text is noise, only speed and memory are measured.

The packed models: `write_packed` replaces every nn.Linear of the decoder layers by random bits in the
layout of a bench method (arbq.kernels.bench.random_packed: random signs and group bits, 8% salient columns,
random fp16 scales; bench.speed.kernel_layout maps pbs2p-6of8 to the rc+cgb scheme in the binary_nm
layout with random 6:8 positions; "NAME/lut" is NAME's binary layout interleaved into binary_lut, as
`arbq pack --interleave` writes it) and writes a real packed dir (safetensors, config.json
quantization_config format 2, arbq_manifest.json) that `arbq.packed.load` reads. Embeddings, norms and
lm_head are copied as stored (bf16). The packed dirs and the checkpoint are cached in the work dir.

`measure` runs one variant in a fresh Python process (so its RSS holds that model only):
    dense-fp32 / dense-bf16      AutoModelForCausalLM.from_pretrained(dtype=...)
    packed-METHOD[-bf16]         arbq.packed.load(dir, dtype=fp32 | bf16) (manifest verified): packed linears
                                 from the bits (the C++ CPU kernel; a "binary" / RC "binary_nm" layer held in
                                 the lookup's own layout, as every CPU load does), everything else in that dtype
Per variant: load_s; RSS from /proc/self/status (VmRSS, RssAnon, RssFile; VmHWM for the peak) of the bare
process (python, torch, transformers, arbq and the CPU kernel imported, model class imported, input ids
built) = `rss_base_mb`, then `rss_load_mb` = VmRSS after loading − base, `rss_run_mb` = VmRSS after every
generate (kernel caches, KV cache) − base, `peak_rss_mb` = VmHWM − base; `rss_{anon,file}_{load,run}_mb` split
them into anonymous memory and file-backed pages: tensors loaded as views of a mapped safetensors file count
only once touched (so a bf16 load shows almost nothing after loading, and never the embedding rows no prompt
used), and while any view lives the whole mapping stays, pages of tensors that were copied (converted to
fp32) included; ≈ 13 MiB of library code first run after the baseline count there too.
Then `warmup` (default 1) untimed and `repeats` timed
    generate(ids, max_new_tokens=T, min_new_tokens=T, do_sample=False, use_cache=True)
with a logits processor that timestamps every token (bench.speed._Clock): prefill_ms = start → first token's
logits (prompt of P tokens + the first step), tokens/s = (T − 1) / (first → last token); medians (every run in
*_all); the load average before/after and the kernel backends the packed linears ran on are recorded.

Bytes (from the safetensors headers): `file_bytes` = every weights file; `linear_bytes` = the decoder
linears as stored (packed tensors, or the dense bf16 weights); `other_bytes` / `other_loaded_bytes` = the rest
(embeddings, lm_head, norms) as stored / at the dtype the variant loads it in. The unbinarized tensors are
everything but the packed linears (every tensor of a dense model), and
    allowed_bytes = file_bytes + Σ_unbinarized (loaded − stored bytes)
is the file with the unbinarized tensors counted at their loaded dtype;
    mem_ratio_load = rss_load_mb / allowed,   mem_ratio = rss_run_mb / allowed.
The issue's criterion "resident memory of a loaded packed model ≤ 1.1× its file size plus the unbinarized
tensors" is mem_ratio ≤ 1.1 (the run figure: it includes what the kernels derive on first use).
`bits_per_weight` = 8 · linear bytes in memory / weights of the decoder linears (the honest bits of the packed
linears; 16 and 32 for the dense bf16 and fp32 variants).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# one per layout the methods write: binary (rc+cgb, billm, x+cgb, sign), binary_lut and binary_nm_lut (NAME/lut:
# `arbq pack --interleave`), binary_nm (pbs2p 6:8 = rc+cgb on 6 of every 8 weights)
METHODS = ("rc+cgb", "rc+cgb/lut", "billm", "x+cgb", "sign", "pbs2p-6of8", "pbs2p-6of8/lut")
LLAMA_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
SYNTH = "e2e_synthetic.json"      # the synthetic checkpoint's parameters (the cache key)
RESULT_TAG = "E2E-RESULT "        # the child's result line on stdout
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- models


def synthetic_llama(path: str | Path, layers: int = 2, hidden: int = 4096, intermediate: int = 11008,
                    heads: int = 32, kv_heads: int = 32, vocab: int = 32000, seed: int = 0, dtype: str = "bf16",
                    std: float = 0.02) -> Path:
    """A dense HF Llama checkpoint with random weights: config.json + model.safetensors (N(0, std) weights,
    unit norm weights, in `dtype`), untied lm_head, no tokenizer. Kept if `path` already holds the same one."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from arbq.fileio import atomic_path, read_json, write_json
    from arbq.models.lazy import params_on_meta

    path = Path(path)
    params = dict(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                  vocab=vocab, seed=seed, dtype=dtype, std=std)
    if (path / SYNTH).is_file() and read_json(path / SYNTH) == params and (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / SYNTH).unlink(missing_ok=True)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cfg.dtype = DTYPES[dtype]
    with params_on_meta():     # shapes only (not torch.device("meta"): it would catch tensors made at import)
        skeleton = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, t in skeleton.state_dict().items():
        if t.dim() == 1:    # RMSNorm weights
            tensors[key] = torch.ones(t.shape, dtype=DTYPES[dtype])
        else:
            tensors[key] = torch.empty(t.shape).normal_(0.0, std, generator=g).to(DTYPES[dtype])
    with atomic_path(path / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    del tensors
    cfg.save_pretrained(path)
    write_json(path / SYNTH, params)
    return path


def _bench_config(method: str):
    """The recipe of bench method `method` ("NAME/lut": NAME's), or None for a bare method name."""
    from bench.methods import METHODS as BENCH_METHODS
    from bench.methods import RunSpec

    method = method.removesuffix("/lut")
    return RunSpec(method, *BENCH_METHODS[method]).config() if method in BENCH_METHODS else None


def method_label(method: str) -> str:
    """A bench method name -> the module label `arbq pack` writes (e.g. pbs2p-6of8 -> pbs2p-6:8+cgb; NAME/lut ->
    NAME's)."""
    cfg = _bench_config(method)
    return cfg.label() if cfg is not None else method.removesuffix("/lut")


def random_linear(n: int, k: int, method: str, scale_dtype: str = "fp16", seed: int = 0):
    """The PackedLinear `write_packed` stores for an [n, k] linear of bench method `method` (random bits; the
    method's layout by bench.speed.kernel_layout; "NAME/lut": NAME's binary layout interleaved, binary_lut)."""
    from arbq.kernels.bench import random_packed
    from bench.speed import kernel_layout

    cfg, lay = _bench_config(method), kernel_layout(method)
    return random_packed(n, k, lay["method"], lay["cgb"], scale_dtype, lay["nm"],
                         blocksize=cfg.blocksize if cfg is not None else 128, seed=seed, interleave=lay["interleave"])


def linear_seed(seed: int, j: int) -> int:
    """The random_linear seed of the j-th decoder linear (decoder_linears order) of a packed dir of `seed`."""
    return seed * 100003 + j


def decoder_linears(config) -> list[str]:
    """Full names of the nn.Linear modules of every decoder layer (arbq.models.arch)."""
    from arbq.models.arch import arch_for

    spec = arch_for(config.model_type, config)
    return [f"{spec.layers}.{i}.{lin}" for i in range(config.num_hidden_layers) for lin in spec.linears]


def write_packed(model_dir: str | Path, out: str | Path, method: str, scale_dtype: str = "fp16",
                 seed: int = 0) -> Path:
    """A packed dir of the dense checkpoint `model_dir` with every decoder linear replaced by random bits in
    `method`'s layout (`random_linear`, seed + index of the linear), written as `arbq pack` writes one
    (arbq.stages.pack.ShardWriter, quantization_config format 2, arbq_manifest.json with the size report;
    every linear validated and its bits checked against the layout's formula by SizeReport). The other
    tensors are copied as stored. Kept if `out` already holds the same one."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from arbq.fileio import fsync_tree, read_json, write_json
    from arbq.packed.format import FORMAT_VERSION
    from arbq.packed.layouts import validate
    from arbq.packed.loader import MANIFEST, read_header, weight_files
    from arbq.packed.sizes import SizeReport
    from arbq.stages.pack import MAX_SHARD_BYTES, ShardWriter, quantization_config, replace_dir, write_manifest

    model_dir, out = Path(model_dir), Path(out)
    files = weight_files(model_dir)
    source = {"model": str(model_dir.resolve()), "e2e_method": method, "scale_dtype": scale_dtype, "seed": seed,
              "synthetic": read_json(model_dir / SYNTH) if (model_dir / SYNTH).is_file() else None,
              "model_files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}
    if (out / MANIFEST).is_file() and read_json(out / MANIFEST).get("source") == source:
        return out
    config = AutoConfig.from_pretrained(model_dir)
    header = read_header(files)
    names = decoder_linears(config)
    label = method_label(method)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer, sizes, modules, done = ShardWriter(tmp, MAX_SHARD_BYTES), SizeReport(), {}, set()
        dense = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                dense.update({key: (f, key) for key in h.keys()})
        for j, name in enumerate(names):
            n, k = header[f"{name}.weight"][0]
            p = random_linear(n, k, method, scale_dtype, seed=linear_seed(seed, j))
            validate(p, name)
            tensors = dict(p.tensors)
            if f"{name}.bias" in dense:
                tensors["bias"] = _read(*dense[f"{name}.bias"])
            sizes.add(name, p.spec, tensors, method=label)
            writer.add({f"{name}.{s}": t for s, t in tensors.items()})
            modules[name] = {"layout": p.spec.layout, "method": label, "params": p.spec.to_params()}
            done |= {f"{name}.weight", f"{name}.bias"}
        params = sum(_numel(shape) for shape, _ in header.values())
        for f in files:                       # the other tensors as stored, one open per file
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    if key not in done:
                        writer.add({key: h.get_tensor(key)})
        written = writer.close()
        cfg = read_json(model_dir / "config.json")
        cfg.update(quantization_config=quantization_config(modules), use_cache=True)
        write_json(tmp / "config.json", cfg)
        packed_bytes = sum((tmp / f).stat().st_size for f in written if f.endswith(".safetensors"))
        rep = sizes.to_dict(params, packed_bytes, format_version=FORMAT_VERSION, method=label, scale_dtype=scale_dtype)
        write_manifest(tmp, source, rep)
        fsync_tree(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read(f: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        return h.get_tensor(key)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------- measuring


def parse_kind(kind: str) -> tuple[str, str | None, str]:
    """"dense-fp32" -> ("dense", None, "fp32"); "packed-rc+cgb" -> ("packed", "rc+cgb", "fp32");
    "packed-rc+cgb-bf16" -> ("packed", "rc+cgb", "bf16")."""
    if kind in ("dense-fp32", "dense-bf16"):
        return "dense", None, kind.removeprefix("dense-")
    if kind.startswith("packed-"):
        m = kind.removeprefix("packed-")
        for d in ("bf16", "fp32"):
            if m.endswith(f"-{d}"):
                return "packed", m.removesuffix(f"-{d}"), d
        return "packed", m, "fp32"
    raise ValueError(f"unknown e2e variant {kind!r}: dense-fp32, dense-bf16, packed-METHOD[-bf16]")


def weight_bytes(model_dir: str | Path, load_dtype: str) -> dict:
    """Byte counts of a (dense or packed) model dir from its safetensors headers (see the module docstring).
    Unbinarized tensors: every tensor of a dense dir; in a packed dir the ones outside the packed modules."""
    from arbq.fileio import read_json
    from arbq.packed.loader import read_header, weight_files

    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    header = read_header(files)
    modules = (read_json(model_dir / "config.json").get("quantization_config") or {}).get("modules") or {}
    if modules:
        linear = {key for key in header if key.rpartition(".")[0] in modules}
        weights = sum(m["params"]["out_features"] * m["params"]["in_features"] for m in modules.values())
    else:
        from transformers import AutoConfig

        linear = {f"{n}.weight" for n in decoder_linears(AutoConfig.from_pretrained(model_dir))}
        weights = sum(_numel(header[key][0]) for key in linear)
    to = torch.empty(0, dtype=DTYPES[load_dtype]).element_size()
    stored = {key: _numel(shape) * torch.empty(0, dtype=dt).element_size() for key, (shape, dt) in header.items()}
    loaded = {key: _numel(shape) * to if dt.is_floating_point else stored[key] for key, (shape, dt) in header.items()}
    unbinarized = [key for key in header if not (modules and key in linear)]
    file_bytes = sum(f.stat().st_size for f in files)
    linear_mem = sum((stored if modules else loaded)[key] for key in linear)
    return {"file_bytes": file_bytes, "linear_bytes": sum(stored[key] for key in linear),
            "other_bytes": sum(stored[key] for key in header if key not in linear),
            "other_loaded_bytes": sum(loaded[key] for key in header if key not in linear),
            "allowed_bytes": file_bytes + sum(loaded[key] - stored[key] for key in unbinarized),
            "linear_weights": weights, "bits_per_weight": 8 * linear_mem / max(weights, 1),
            "stored_bits_per_weight": 8 * sum(stored[key] for key in linear) / max(weights, 1)}


def _mem() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) / 1024
    return out


def _model_class(model_dir: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]


def measure_here(model_dir: str | Path, kind: str, prompt_tokens: int = 128, new_tokens: int = 16, repeats: int = 3,
                 seed: int = 0, threads: int | None = None, warmup: int = 1) -> dict:
    """One variant in this process (see the module docstring); `measure` runs it in a fresh one."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from arbq.kernels import cpu
    from arbq.packed import loader
    from bench.speed import _Clock

    if threads:
        torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    what, method, dt = parse_kind(kind)
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (tokens/s is measured between the first and last token)")
    cpu.extension()                     # build/load the C++ kernel before the baseline (every variant alike)
    _model_class(model_dir)             # import the modeling code too
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    gc.collect()
    base = _mem()
    t0 = time.perf_counter()
    if what == "dense":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dt]).eval()
    else:
        model = loader.load(model_dir, dtype=DTYPES[dt])
    load_s = time.perf_counter() - t0
    gc.collect()
    after_load = _mem()

    def run() -> tuple[float, float, list[int]]:
        clock = _Clock(False)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([clock]))
        return 1e3 * (clock.t[0] - t), (new_tokens - 1) / (clock.t[-1] - clock.t[0]), out[0, ids.shape[1]:].tolist()

    load_avg = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    first = run()    # warm-up (the kernels prepare their caches here)
    for _ in range(warmup - 1):
        run()
    times = [run()[:2] for _ in range(repeats)]
    gc.collect()
    after = _mem()
    from arbq.packed.binary_linear import BinaryLinear

    backends = sorted({v.NAME for mod in model.modules() if isinstance(mod, BinaryLinear)
                       for key, v in mod.kernel_cache().items() if isinstance(key, tuple) and key[0] == "backend"})
    mib = lambda v: v / 2**20  # noqa: E731
    wb = weight_bytes(model_dir, dt)
    rss_load, rss_run = after_load["VmRSS"] - base["VmRSS"], after["VmRSS"] - base["VmRSS"]
    return {
        "kind": kind, "model": what, "method": method, "dtype": dt, "dir": str(model_dir),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
        "load_s": load_s, "kernel_backends": backends, "loadavg_before": load_avg,
        "loadavg_after": [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]],
        "prefill_ms": statistics.median(t[0] for t in times), "tokens_per_s": statistics.median(t[1] for t in times),
        "prefill_ms_all": [t[0] for t in times], "tokens_per_s_all": [t[1] for t in times],
        "warmup_prefill_ms": first[0], "warmup_tokens_per_s": first[1], "tokens": first[2],
        "rss_base_mb": base["VmRSS"], "rss_load_mb": rss_load, "rss_run_mb": rss_run,
        "peak_rss_mb": after["VmHWM"] - base["VmRSS"],
        "rss_anon_load_mb": after_load["RssAnon"] - base["RssAnon"],
        "rss_file_load_mb": after_load["RssFile"] - base["RssFile"],
        "rss_anon_run_mb": after["RssAnon"] - base["RssAnon"], "rss_file_run_mb": after["RssFile"] - base["RssFile"],
        **{k.removesuffix("_bytes") + "_mb": mib(v) for k, v in wb.items() if k.endswith("_bytes")},
        "linear_weights": wb["linear_weights"], "bits_per_weight": wb["bits_per_weight"],
        "stored_bits_per_weight": wb["stored_bits_per_weight"],
        "mem_ratio_load": rss_load / mib(wb["allowed_bytes"]), "mem_ratio": rss_run / mib(wb["allowed_bytes"]),
    }


def measure(model_dir: str | Path, kind: str, prompt_tokens: int = 128, new_tokens: int = 16, repeats: int = 3,
            seed: int = 0, threads: int | None = None, warmup: int = 1, subprocess_: bool = True,
            timeout: float = 3600) -> dict:
    """`measure_here` in a fresh `python -m bench.e2e --child` process (subprocess_=False: in this one, whose
    RSS then holds whatever else it loaded)."""
    args = dict(model_dir=str(model_dir), kind=kind, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                repeats=repeats, seed=seed, threads=threads, warmup=warmup)
    if not subprocess_:
        return measure_here(**args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run([sys.executable, "-m", "bench.e2e", "--child", json.dumps(args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    line = next((s for s in reversed(p.stdout.splitlines()) if s.startswith(RESULT_TAG)), None)
    if p.returncode != 0 or line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"e2e variant {kind} failed (exit {p.returncode}): {' | '.join(tail)}")
    return json.loads(line.removeprefix(RESULT_TAG))


# ---------------------------------------------------------------------------------------------- the whole table


def variants(methods=METHODS, packed_dtypes=("fp32", "bf16")) -> list[str]:
    out = ["dense-fp32", "dense-bf16"]
    for m in methods:
        out += [f"packed-{m}" + ("" if d == "fp32" else f"-{d}") for d in packed_dtypes]
    return out


def run_all(work: str | Path, layers: int = 2, methods=METHODS, packed_dtypes=("fp32", "bf16"),
            prompt_tokens: int = 128, new_tokens: int = 16, repeats: int = 3, threads: int | None = None,
            seed: int = 0, dims: dict | None = None, log=print, progress=None, warmup: int = 1) -> dict:
    """Build (or reuse) the synthetic checkpoint and its packed dirs under `work`, then `measure` every variant
    one after another, each in its own process. A failed variant is recorded under variants/KIND/error.
    progress(res) is called after every variant (to save partial results)."""
    dims = {**LLAMA_7B, **(dims or {})}
    work = Path(work)
    t_all = time.perf_counter()
    tag = f"llama-l{layers}-h{dims['hidden']}-i{dims['intermediate']}-v{dims['vocab']}-s{seed}"
    t0 = time.perf_counter()
    dense = synthetic_llama(work / tag / "dense", layers=layers, seed=seed, **dims)
    build = {"dense_s": time.perf_counter() - t0}
    res: dict = {"model": {"what": f"synthetic Llama ({layers} decoder layers, random N(0, 0.02) bf16 weights, "
                                   "untied lm_head; packed linears: random bits in each method's layout, "
                                   "8% salient columns, fp16 scales)", "layers": layers, **dims, "seed": seed,
                           "dir": str(dense)},
                 "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                 "threads": threads or torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                 "device": "cpu", "build": build, "order": variants(methods, packed_dtypes), "variants": {}}
    dirs = {}
    for m in methods:
        t0 = time.perf_counter()
        try:
            dirs[m] = write_packed(dense, work / tag / f"packed-{m.replace('/', '-')}", m, seed=seed)
        except Exception as e:  # one broken layout must not lose the others
            res["variants"][f"packed-{m}"] = {"kind": f"packed-{m}", "error": f"{type(e).__name__}: {e}"}
        build[f"packed_{m}_s"] = time.perf_counter() - t0
    broken = {k: res["variants"].pop(k) for k in list(res["variants"])}
    for kind in variants(methods, packed_dtypes):
        what, m, _ = parse_kind(kind)
        if what == "packed" and m not in dirs:
            res["variants"][kind] = {**broken[f"packed-{m}"], "kind": kind}
            continue
        log(f"e2e: {kind} ...")
        t0 = time.perf_counter()
        try:
            r = measure(dense if what == "dense" else dirs[m], kind, prompt_tokens, new_tokens, repeats, seed, threads,
                        warmup)
        except Exception as e:
            r = {"kind": kind, "error": f"{type(e).__name__}: {e}"}
        r["wall_s"] = time.perf_counter() - t0
        res["variants"][kind] = r
        if "error" in r:
            log(f"e2e: {kind}: {r['error']}")
        else:
            log(f"e2e: {kind}: prefill {r['prefill_ms']:.0f} ms, {r['tokens_per_s']:.2f} tok/s, "
                f"RSS {r['rss_run_mb']:.0f} MiB ({r['wall_s']:.0f} s)")
        if progress:
            progress(res)
    _speedups(res)
    res["wall_s"] = time.perf_counter() - t_all
    return res


def _speedups(res: dict) -> None:
    v = res["variants"]
    for key, ref in (("speedup_vs_fp32", "dense-fp32"), ("speedup_vs_bf16", "dense-bf16")):
        base = v.get(ref, {}).get("tokens_per_s")
        for r in v.values():
            if base and "tokens_per_s" in r:
                r[key] = r["tokens_per_s"] / base


def e2e_table(res: dict):
    """A rich Table of run_all's results (or of bench results holding them under "e2e")."""
    from rich.table import Table

    res = res.get("e2e", res)
    m = res["model"]
    t = Table(title=f"5. End-to-end greedy decode on CPU — {m['what']}: hidden {m['hidden']}, intermediate "
                    f"{m['intermediate']}, {m['heads']} heads ({m['kv_heads']} kv), vocab {m['vocab']}; "
                    f"{res['new_tokens']} new tokens after a {res['prompt_tokens']}-token prompt of random ids, "
                    f"KV cache on, median of {res['repeats']} runs after {res.get('warmup', 1)} warm-up, one fresh "
                    f"process per row, {res['threads']} threads. RSS: VmRSS after load / after the runs minus the bare "
                    "process (file-mapped: the part that is pages of a still-mapped weights file); RSS / allowed = "
                    "RSS after the runs / (file size with the unbinarized tensors at the loaded dtype): the issue's "
                    "bound is ≤ 1.1; × = decode tokens/s ratio")
    cols = ("model", "dtype", "bits/w linears", "file MiB", "RSS MiB load / run", "file-mapped MiB", "peak MiB",
            "RSS / allowed", "prefill ms", "decode tok/s", "× dense fp32", "× dense bf16")
    for c in cols:
        t.add_column(c, justify="left" if c in ("model", "dtype") else "right")

    def x(v):
        return "—" if v is None else f"{v:.2f}×"

    def mb(v):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"

    order = [k for k in res.get("order", []) if k in res["variants"]]     # results.json sorts its keys
    for kind in order + [k for k in res["variants"] if k not in order]:
        r = res["variants"][kind]
        what, method, dt = parse_kind(kind)
        name = "dense (bf16 checkpoint)" if what == "dense" else f"packed {method}"
        if "error" in r:
            t.add_row(name, dt, f"[red]{r['error']}", *[""] * (len(cols) - 3))
            continue
        t.add_row(name, dt, f"{r['bits_per_weight']:.3f}", mb(r["file_mb"]),
                  f"{mb(r['rss_load_mb'])} / {mb(r['rss_run_mb'])}", mb(r["rss_file_run_mb"]), mb(r["peak_rss_mb"]),
                  f"{r['mem_ratio']:.3f}", f"{r['prefill_ms']:.0f}", f"{r['tokens_per_s']:.2f}",
                  x(r.get("speedup_vs_fp32")), x(r.get("speedup_vs_bf16")))
    return t


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--layers", type=int, default=2, help="decoder layers (default 2)")
    a("--hidden", type=int, default=LLAMA_7B["hidden"])
    a("--intermediate", type=int, default=LLAMA_7B["intermediate"])
    a("--heads", type=int, default=LLAMA_7B["heads"])
    a("--kv-heads", type=int, default=LLAMA_7B["kv_heads"])
    a("--vocab", type=int, default=LLAMA_7B["vocab"])
    a("--methods", default=",".join(METHODS), help=f"comma list (default {','.join(METHODS)})")
    a("--packed-dtypes", default="fp32,bf16", help="dtypes the packed models are loaded in (default fp32,bf16)")
    a("--prompt-tokens", type=int, default=128)
    a("--new-tokens", type=int, default=16)
    a("--repeats", type=int, default=3)
    a("--warmup", type=int, default=1, help="untimed generate runs before the timed ones (default 1)")
    a("--threads", type=int, help="torch threads in every child (default torch's default)")
    a("--seed", type=int, default=0)
    a("--work", type=Path, default=REPO / "bench" / "out" / "e2e", help="where the models are built (cached)")
    a("--out", type=Path, help="results JSON")
    a("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        r = measure_here(**json.loads(args.child))
        print(RESULT_TAG + json.dumps(r), flush=True)
        return 0
    from rich.console import Console

    from arbq.fileio import write_json

    dims = dict(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads,
                vocab=args.vocab)
    csv = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    save = (lambda r: write_json(args.out, r)) if args.out else None
    res = run_all(args.work, args.layers, csv(args.methods), csv(args.packed_dtypes), args.prompt_tokens,
                  args.new_tokens, args.repeats, args.threads, args.seed, dims, progress=save, warmup=args.warmup)
    if args.out:
        write_json(args.out, res)
    Console(width=max(Console().width, 160)).print(e2e_table(res))
    if args.out:
        print(f"results → {args.out} ({res['wall_s']:.0f} s)")
    return 1 if any("error" in r for r in res["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
