"""`arbq calibrate`: calibration token windows plus per-layer full-precision Hessians.

DIR/samples.safetensors      {"input_ids": [n, seqlen] int64}
DIR/stats/layer_0007.safetensors  {"<first linear of a shared-input group>": H [K, K] float32},
                             H = (2/n) Σ xᵀx over the n calibration tokens, from a full-precision
                             forward through layers 0..i-1; metadata "arbq" = {"layer": 7, "groups": [...]}
DIR/manifest.json            model, data, seed, sizes, library versions, sha256 of every file;
                             "complete": false until every layer is written.
Resumable: `--resume` keeps complete layer files and recomputes inputs up to the first missing one.
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
from arbq.models.loading import ModelRef, load_config, load_model, load_tokenizer, max_context, resolve

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


def run_calibrate(model: str, out: Path, data: str = "wikitext2", nsamples: int = 128, seqlen: int = 2048,
                  seed: int = 0, stats: bool = True, resume: bool = False, device: str = "cpu") -> dict:
    """Write samples, statistics and manifest to `out`; returns the manifest."""
    out = Path(out)
    ref = resolve(model)
    spec = archmod.arch_for(load_config(ref).model_type)
    params = {"model": str(ref), "data": data, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
              "stats": stats}
    mpath = out / "manifest.json"
    if mpath.exists():
        old = read_json(mpath)
        if not resume:
            raise ArbqError(f"{out} already holds a calibration; pass --resume to continue it or choose a new -o")
        if old.get("params") != params:
            raise ArbqError(f"{out} was calibrated with different settings: {old.get('params')}")
        samples, _ = load_samples(out)
    else:
        samples = make_samples(ref, data, nsamples, seqlen, seed)
        save_tensors(out / "samples.safetensors", {"input_ids": samples})
        write_json(mpath, {"params": params, "complete": False, "versions": library_versions()})
    num_layers = _write_stats(ref, spec, samples, out, device) if stats else 0
    names = ["samples.safetensors"] + [str(stats_path(out, i).relative_to(out)) for i in range(num_layers)]
    manifest = {"params": params, "complete": True, "versions": library_versions(),
                "num_layers": num_layers, "tokens": int(samples.numel()), "files": file_hashes(out, names)}
    write_json(mpath, manifest)
    console.print(f"calibration: {samples.shape[0]} × {samples.shape[1]} tokens from {data} → {out}")
    return manifest


def _write_stats(ref: ModelRef, spec: archmod.ArchSpec, samples: torch.Tensor, out: Path, device: str) -> int:
    model, _ = load_model(ref)
    layers = archmod.decoder_layers(model, spec)
    todo = [i for i in range(len(layers)) if not stats_complete(out, i)]
    if not todo:
        return len(layers)
    x, kwargs = layerwise.capture_inputs(model, layers, samples, device)
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("calibrate", total=len(layers))
        for i, layer in enumerate(layers):
            dtype = next(layer.parameters()).dtype
            layer.to(device, torch.float32)
            if i < todo[0]:
                x = layerwise.forward_layer(layer, x, kwargs, device, f"layer {i}")
            else:
                lin = archmod.layer_linears(layer, spec)
                reps = {g[0]: lin[g[0]] for g in spec.groups}
                hess, x = layerwise.accumulate_hessians(layer, reps, x, kwargs, device, name=f"layer {i}")
                if not stats_complete(out, i):
                    save_tensors(stats_path(out, i), hess, info={"layer": i, "groups": spec.groups})
            layer.to("cpu", dtype)
            prog.advance(task)
    return len(layers)
