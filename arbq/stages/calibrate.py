"""`arbq calibrate`: calibration token windows plus per-layer full-precision Hessians.

DIR/samples.safetensors      {"input_ids": [n, seqlen] int64}
DIR/stats/layer_0007.safetensors  {"<first linear of a shared-input group>": H [K, K] float32},
                             H = (2/n) Σ xᵀx over the n calibration tokens, from a full-precision
                             forward through layers 0..i-1; metadata "arbq" = {"layer": 7, "groups": [...]}
                             Mixture-of-experts layers: an expert's H is over the tokens routed to it
                             (arbq.models.moe; gate/up under its gate_proj, down under its down_proj) and
                             the metadata adds "experts": {group's first linear: {"expert", "tokens",
                             "hessian"}} for the report
                             and "influence": the layer's block influence 1 − mean cos(h_in, h_out) over
                             the calibration tokens (layerwise.block_influence; read by CFS, arbq.methods.cfs)
DIR/manifest.json            params (model, data, seed, sizes, hessian_dtype), model identity (resolved
                             path or hub id, revision, weight-file sizes), how it ran (device, activation
                             offload, lazy loading), library versions, sha256 of every file (recorded as
                             each file is written); "complete": false until every layer is written.
Every read is verified against the recorded sha256 (a corrupt or modified file is refused, never
re-hashed). Resumable: `--resume` refuses other settings or another model, keeps the layer files whose
hash matches and recomputes inputs up to the first missing one. One writer at a time (fileio.output_lock).
Memory: a safetensors model is read one decoder layer at a time (arbq.models.lazy); the calibration
activations live on the device, in CPU memory or on disk (`offload`, arbq.models.activations).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from arbq import data as textdata
from arbq.errors import ArbqError
from arbq.fileio import (
    library_versions,
    load_tensors,
    output_lock,
    read_info,
    read_json,
    save_tensors,
    sha256_file,
    write_json,
)
from arbq.models import arch as archmod
from arbq.models import layerwise, moe
from arbq.models.activations import check_offload, scratch
from arbq.models.lazy import open_layerwise
from arbq.models.loading import ModelRef, check_device, load_config, load_tokenizer, max_context, resolve

console = Console(stderr=True)


SAMPLES = "samples.safetensors"


def stats_name(i: int) -> str:
    return f"stats/layer_{i:04d}.safetensors"


def stats_path(out: Path, i: int) -> Path:
    return out / stats_name(i)


def verify_file(calib: Path, name: str, manifest: dict) -> None:
    """Refuse `calib/name` if its sha256 differs from the manifest's (a corrupt or modified file), or if a
    complete manifest does not list it. Files of manifests older than the hashes are not checked."""
    want = (manifest.get("files") or {}).get(name)
    p = Path(calib) / name
    if want is None:
        if manifest.get("complete") and manifest.get("files") is not None:
            raise ArbqError(f"{p} is not listed in {calib}/manifest.json; recalibrate")
        return
    if not p.is_file():
        raise ArbqError(f"missing file listed in manifest: {p}")
    if sha256_file(p) != want:
        raise ArbqError(f"sha256 mismatch for {p}: the file is corrupt or was modified; recalibrate")


def stats_complete(out: Path, i: int) -> bool:
    return (read_info(stats_path(out, i)) or {}).get("layer") == i


def is_complete(calib: Path) -> bool:
    """True once `calibrate` has written every file of `calib` (its manifest says so)."""
    return (calib / "manifest.json").is_file() and bool(read_json(calib / "manifest.json").get("complete"))


def load_samples(calib: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(input_ids [n, seqlen], manifest) of a calibration dir, after checking its sample hash and that
    the shape is the manifest's nsamples × seqlen (a file from another calibration is refused)."""
    calib = Path(calib)
    manifest = read_json(calib / "manifest.json")
    if not isinstance(manifest, dict):
        raise ArbqError(f"corrupt {calib}/manifest.json: not a JSON object")
    verify_file(calib, SAMPLES, manifest)
    ids = load_tensors(calib / SAMPLES).get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype != torch.int64:
        raise ArbqError(f"{calib}/{SAMPLES} has no [n, seqlen] int64 input_ids tensor")
    params = manifest.get("params") or {}
    want = (params.get("nsamples"), params.get("seqlen"))
    if None not in want and tuple(ids.shape) != want:
        raise ArbqError(f"{calib}/{SAMPLES} holds {tuple(ids.shape)} token ids but the manifest says "
                        f"nsamples × seqlen = {want}")
    return ids, manifest


def load_layer_stats(calib: Path, i: int, groups: tuple[tuple[str, ...], ...],
                     manifest: dict | None = None) -> dict[str, torch.Tensor]:
    """{linear name: H} for layer i from stored statistics (shared-input linears share H), after
    checking the file's sha256 against the manifest."""
    calib = Path(calib)
    if not stats_complete(calib, i):
        raise ArbqError(f"{calib} has no statistics for layer {i} (run `arbq calibrate` with --stats)")
    verify_file(calib, stats_name(i), manifest if manifest is not None else read_json(calib / "manifest.json"))
    t = load_tensors(stats_path(calib, i))
    missing = [g[0] for g in groups if g[0] not in t]
    if missing:
        raise ArbqError(f"{stats_path(calib, i)} has no statistics for {', '.join(missing)}: made for another model")
    return {name: t[g[0]] for g in groups for name in g}


def load_influence(calib: Path, num_layers: int) -> list[float]:
    """Every layer's block influence (1 − mean cos(h_in, h_out), see layerwise.block_influence) from the
    stored statistics' headers, each file checked against the manifest's sha256 first."""
    calib = Path(calib)
    manifest = read_json(calib / "manifest.json")
    out = []
    for i in range(num_layers):
        if not stats_complete(calib, i):
            raise ArbqError(f"{calib} has no statistics for layer {i} (run `arbq calibrate` with --stats)")
        verify_file(calib, stats_name(i), manifest)
        value = (read_info(stats_path(calib, i)) or {}).get("influence")
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ArbqError(f"{stats_path(calib, i)} records no layer influence (calibrated by an older arbq): "
                            "run `arbq calibrate` again to use the coarse stage (nm_cfs)")
        out.append(float(value))
    return out


def load_expert_report(calib: Path, i: int, groups: tuple[tuple[str, ...], ...]) -> dict[str, dict]:
    """{expert linear: {"expert", "tokens", "hessian"}} of layer i's stored statistics (empty for a model
    without experts); read from the statistics file's header, after `load_layer_stats` checked it."""
    experts = (read_info(stats_path(Path(calib), i)) or {}).get("experts") or {}
    return {name: experts[g[0]] for g in groups if g[0] in experts for name in g}


def model_identity(ref: ModelRef, config=None) -> dict:
    """What identifies the weights: resolved path or hub id, hub revision (commit) when known, and the
    size of every weight file (a checkpoint replaced in place is noticed without hashing gigabytes)."""
    from arbq.models.checkpoint import checkpoint_dir

    config = config if config is not None else load_config(ref)
    root = checkpoint_dir(ref)
    if ref.gguf_file:
        files = [Path(ref.path) / ref.gguf_file]
    elif root is not None:
        files = [f for f in sorted(root.iterdir()) if f.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    else:
        files = []
    return {"model": str(ref), "revision": getattr(config, "_commit_hash", None),
            "weight_sizes": {f.name: f.stat().st_size for f in files if f.is_file()}}


def check_identity(what: Path, old: dict | None, new: dict) -> None:
    """Refuse to resume `what` with another model (path, revision or weight files differ)."""
    if old is None:
        return
    for key in ("model", "revision", "weight_sizes"):
        if old.get(key) != new.get(key):
            raise ArbqError(f"cannot resume {what}: the model's {key.replace('_', ' ')} differs "
                            f"({old.get(key)} vs {new.get(key)}); choose a new -o")


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
    """Write samples, statistics and manifest to `out` (holding its lock); returns the manifest."""
    out = Path(out)
    ref = resolve(model)
    check_device(device)
    check_offload(offload)
    hdtype = layerwise.hessian_dtype(hessian_dtype)
    config = load_config(ref)
    spec = archmod.arch_for(config.model_type, config)
    params = {"model": str(ref), "data": data, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
              "stats": stats, "hessian_dtype": hessian_dtype}
    identity = model_identity(ref, config)
    with output_lock(out):
        return _calibrate(ref, spec, out, params, identity, resume, device, offload, hdtype, lazy)


def _start(ref: ModelRef, out: Path, params: dict, identity: dict, resume: bool) -> tuple[torch.Tensor, dict]:
    """(samples, manifest so far): a new calibration's samples, or a resumed one's after checking that
    settings and model are the same and its samples are intact."""
    mpath = out / "manifest.json"
    if not mpath.exists():
        samples = make_samples(ref, params["data"], params["nsamples"], params["seqlen"], params["seed"])
        save_tensors(out / SAMPLES, {"input_ids": samples})
        manifest = {"params": params, "model_identity": identity, "complete": False,
                    "versions": library_versions(), "files": {SAMPLES: sha256_file(out / SAMPLES)}}
        write_json(mpath, manifest)
        return samples, manifest
    old = read_json(mpath)
    if not resume:
        raise ArbqError(f"{out} already holds a calibration; pass --resume to continue it or choose a new -o")
    if not isinstance(old, dict) or not same_params(old.get("params"), params):
        before = {"hessian_dtype": "float32", **((old or {}).get("params") or {})}
        diff = ", ".join(f"{k} {before.get(k)!r} (now {v!r})" for k, v in params.items() if before.get(k) != v)
        raise ArbqError(f"cannot resume {out}: it was calibrated with different settings: {diff}")
    check_identity(out, old.get("model_identity"), identity)
    samples, _ = load_samples(out)
    files = old.get("files")
    if not isinstance(files, dict):     # a calibration from before hashes were recorded as written
        files = {SAMPLES: sha256_file(out / SAMPLES)}
    return samples, {**old, "model_identity": identity, "files": files}


def _calibrate(ref: ModelRef, spec: archmod.ArchSpec, out: Path, params: dict, identity: dict, resume: bool,
               device: str, offload: str, hdtype: torch.dtype, lazy: bool) -> dict:
    mpath = out / "manifest.json"
    samples, manifest = _start(ref, out, params, identity, resume)
    files = manifest["files"]
    runtime = manifest.get("runtime") or {"device": device, "offload_activations": offload, "lazy": False}
    wrote = False

    def record(i: int) -> None:       # hash a stats file right after writing it, never later
        nonlocal wrote
        files[stats_name(i)] = sha256_file(stats_path(out, i))
        write_json(mpath, {**manifest, "complete": False, "files": files})
        wrote = True

    num_layers = 0
    finished = manifest.get("num_layers") if manifest.get("complete") else None
    if params["stats"] and isinstance(finished, int) and all(stats_path(out, i).is_file() for i in range(finished)):
        num_layers = finished                       # nothing to compute: only verify, without loading the model
        if len(_done_layers(out, num_layers, files)) != num_layers:
            raise ArbqError(f"{out}/manifest.json does not record every statistics file; recalibrate")
    elif params["stats"]:
        num_layers = _write_stats(ref, spec, samples, out, device, offload, hdtype, lazy, runtime, files, record)
        if wrote:
            runtime = {"device": device, "offload_activations": offload, "lazy": runtime["lazy"]}
    names = [SAMPLES] + [stats_name(i) for i in range(num_layers)]
    final = {"params": params, "model_identity": identity, "complete": True, "versions": library_versions(),
             "runtime": runtime, "num_layers": num_layers, "tokens": int(samples.numel()),
             "files": {n: files[n] for n in sorted(names)}}
    if manifest.get("complete") and not wrote:
        final = read_json(mpath)        # verified and unchanged: the manifest (and its sha256) stays as it is
    else:
        write_json(mpath, final)
    console.print(f"calibration: {samples.shape[0]} × {samples.shape[1]} tokens from {params['data']} → {out}")
    return final


def _done_layers(out: Path, n: int, files: dict[str, str]) -> set[int]:
    """Layers whose statistics are already written: present and recorded with a matching sha256. A
    recorded file that no longer matches is corrupt (refused); a missing or unrecorded one is redone."""
    done = set()
    for i in range(n):
        name = stats_name(i)
        if name in files and stats_path(out, i).is_file():
            verify_file(out, name, {"files": files})
            done.add(i)
        else:
            files.pop(name, None)
    return done


def _write_stats(ref: ModelRef, spec: archmod.ArchSpec, samples: torch.Tensor, out: Path, device: str,
                 offload: str, hdtype: torch.dtype, lazy: bool, runtime: dict, files: dict[str, str],
                 record) -> int:
    """Per-layer Hessians of a full-precision forward, one decoder layer in memory at a time; `record(i)`
    is called right after layer i's file is written."""
    net = open_layerwise(ref, lazy=lazy)
    done = _done_layers(out, len(net), files)
    todo = [i for i in range(len(net)) if i not in done]
    if not todo:
        return len(net)
    runtime["lazy"] = net.lazy
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
                reps = {g[0]: lin[g[0]] for g in spec.groups if not archmod.is_expert(spec, g[0])}
                info: dict[str, Any] = {"layer": i, "groups": spec.groups}
                with layerwise.block_influence(layer) as influence:
                    if spec.moe is None:
                        hess, _ = layerwise.accumulate_hessians(layer, reps, x, kwargs, device, hdtype,
                                                                f"layer {i}", out=y, keep=y is not None)
                    else:                     # experts: from the tokens routed to each, in the same pass
                        st, _ = moe.accumulate_expert_hessians(layer, spec.moe, x, kwargs, device, hdtype,
                                                               f"layer {i}", dense=reps, out=y, keep=y is not None)
                        hess = {g[0]: st.hessians[g[0]] for g in spec.groups}
                        info["experts"] = {g[0]: moe.expert_report(st, g[0]) for g in spec.groups
                                           if archmod.is_expert(spec, g[0])}
                info["influence"] = influence()
                if i not in done:
                    save_tensors(stats_path(out, i), hess, info=info)
                    record(i)
            net.free_layer(i)
            x.close()
            x = y
            prog.advance(task)
    return len(net)
