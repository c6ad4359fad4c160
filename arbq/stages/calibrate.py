"""`arbq calibrate`: calibration token windows plus per-layer full-precision Hessians.

DIR/samples.safetensors      {"input_ids": [n, seqlen] int64}
DIR/stats/layer_0007.safetensors  {"<first linear of a shared-input group>": H [K, K] float32},
                             H = (2/n) Σ xᵀx over the n calibration tokens, from a full-precision
                             forward through layers 0..i-1; metadata "arbq" = {"layer": 7, "groups": [...]}
DIR/manifest.json            params (model, data, seed, sizes, hessian_dtype), how it ran (device,
                             activation offload, lazy loading), library versions, sha256 of every file;
                             "complete": false until every layer is written.
Resumable: `--resume` keeps complete layer files and recomputes inputs up to the first missing one.
Memory: a safetensors model is read one decoder layer at a time (arbq.models.lazy); the calibration
activations live on the device, in CPU memory or on disk (`offload`, arbq.models.activations).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from arbq import data as textdata
from arbq.errors import ArbqError
from arbq.fileio import file_hashes, library_versions, load_tensors, read_info, read_json, save_tensors, write_json
from arbq.models import arch as archmod
from arbq.models import layerwise
from arbq.models.activations import check_offload, scratch
from arbq.models.lazy import open_layerwise
from arbq.models.loading import ModelRef, check_device, load_config, load_tokenizer, max_context, resolve

console = Console(stderr=True)


def stats_path(out: Path, i: int) -> Path:
    return out / "stats" / f"layer_{i:04d}.safetensors"


def stats_complete(out: Path, i: int) -> bool:
    return (read_info(stats_path(out, i)) or {}).get("layer") == i


def is_complete(calib: Path) -> bool:
    """True once `calibrate` has written every file of `calib` (its manifest says so)."""
    return (calib / "manifest.json").is_file() and bool(read_json(calib / "manifest.json").get("complete"))


def load_samples(calib: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(input_ids [n, seqlen], manifest) of a calibration dir, after checking its sample hash."""
    manifest = read_json(calib / "manifest.json")
    ids = load_tensors(calib / "samples.safetensors").get("input_ids")
    if ids is None or ids.dim() != 2:
        raise ArbqError(f"{calib}/samples.safetensors has no [n, seqlen] input_ids tensor")
    return ids, manifest


def load_layer_stats(calib: Path, i: int, groups: tuple[tuple[str, ...], ...]) -> dict[str, torch.Tensor]:
    """{linear name: H} for layer i from stored statistics (shared-input linears share H)."""
    if not stats_complete(calib, i):
        raise ArbqError(f"{calib} has no statistics for layer {i} (run `arbq calibrate` with --stats)")
    t = load_tensors(stats_path(calib, i))
    return {name: t[g[0]] for g in groups for name in g}


def make_samples(ref: ModelRef, data: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    ctx = max_context(load_config(ref))
    if ctx is not None and seqlen > ctx:
        raise ArbqError(f"--seqlen {seqlen} exceeds the model's context length {ctx}")
    tok = load_tokenizer(ref)
    return textdata.sample_windows(textdata.tokenize(tok, textdata.load_text(data, "train")), nsamples, seqlen, seed)


def same_params(old: dict | None, new: dict) -> bool:
    """Manifest params equal, reading a missing hessian_dtype (older manifests) as float32."""
    return {"hessian_dtype": "float32", **(old or {})} == new


def run_calibrate(model: str, out: Path, data: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048,
                  seed: int = 0, stats: bool = True, resume: bool = False, device: str = "cpu",
                  offload: str = "cpu", hessian_dtype: str = "float32", lazy: bool = True) -> dict:
    """Write samples, statistics and manifest to `out`; returns the manifest."""
    out = Path(out)
    ref = resolve(model)
    check_device(device)
    check_offload(offload)
    hdtype = layerwise.hessian_dtype(hessian_dtype)
    spec = archmod.arch_for(load_config(ref).model_type)
    params = {"model": str(ref), "data": data, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
              "stats": stats, "hessian_dtype": hessian_dtype}
    mpath = out / "manifest.json"
    if mpath.exists():
        old = read_json(mpath)
        if not resume:
            raise ArbqError(f"{out} already holds a calibration; pass --resume to continue it or choose a new -o")
        if not same_params(old.get("params"), params):
            raise ArbqError(f"{out} was calibrated with different settings: {old.get('params')}")
        samples, _ = load_samples(out)
    else:
        samples = make_samples(ref, data, nsamples, seqlen, seed)
        save_tensors(out / "samples.safetensors", {"input_ids": samples})
        write_json(mpath, {"params": params, "complete": False, "versions": library_versions()})
    runtime = {"device": device, "offload_activations": offload, "lazy": False}
    num_layers = _write_stats(ref, spec, samples, out, device, offload, hdtype, lazy, runtime) if stats else 0
    names = ["samples.safetensors"] + [str(stats_path(out, i).relative_to(out)) for i in range(num_layers)]
    manifest = {"params": params, "complete": True, "versions": library_versions(), "runtime": runtime,
                "num_layers": num_layers, "tokens": int(samples.numel()), "files": file_hashes(out, names)}
    write_json(mpath, manifest)
    console.print(f"calibration: {samples.shape[0]} × {samples.shape[1]} tokens from {data} → {out}")
    return manifest


def _write_stats(ref: ModelRef, spec: archmod.ArchSpec, samples: torch.Tensor, out: Path, device: str,
                 offload: str, hdtype: torch.dtype, lazy: bool, runtime: dict) -> int:
    """Per-layer Hessians of a full-precision forward, one decoder layer in memory at a time."""
    net = open_layerwise(ref, lazy=lazy)
    runtime["lazy"] = net.lazy
    todo = [i for i in range(len(net)) if not stats_complete(out, i)]
    if not todo:
        return len(net)
    with scratch(out, offload, device) as acts, Progress(console=console, transient=True) as prog:
        x, kwargs = net.layer0_inputs(samples, device, acts.new(len(samples)))
        task = prog.add_task("calibrate", total=len(net))
        for i in range(len(net)):
            layer = net.load_layer(i, device)
            y = acts.new(len(samples)) if i < len(net) - 1 else None   # the last layer's outputs are not needed
            if i < todo[0]:
                layerwise.forward_layer(layer, x, kwargs, device, f"layer {i}", out=y, keep=y is not None)
            else:
                lin = archmod.layer_linears(layer, spec)
                reps = {g[0]: lin[g[0]] for g in spec.groups}
                hess, _ = layerwise.accumulate_hessians(layer, reps, x, kwargs, device, hdtype, f"layer {i}", out=y,
                                                        keep=y is not None)
                if not stats_complete(out, i):
                    save_tensors(stats_path(out, i), hess, info={"layer": i, "groups": spec.groups})
            net.free_layer(i)
            x.close()
            x = y
            prog.advance(task)
    return len(net)
