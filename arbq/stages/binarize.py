"""`arbq binarize`: binarize every decoder layer's linears, one layer at a time, resumably.

Sequential (default, as the paper): layer i is binarized from the activations that went through the
already-binarized layers 0..i-1, re-running each finished layer once on the calibration samples.
`--no-sequential` takes each layer's Hessians from `calibrate`'s stored statistics instead; layers
are then independent, so `--layers A:B` can shard the job across machines.
Files: see `arbq.stages.run_dir`. Each layer file is written atomically; `--resume` starts at the
first layer without a complete file and reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from arbq.errors import ArbqError
from arbq.fileio import sha256_file, write_json
from arbq.methods.config import BinarizeConfig
from arbq.methods.gptq import binarize_linear
from arbq.methods.result import LinearResult
from arbq.models import arch as archmod
from arbq.models import layerwise
from arbq.models.loading import load_config, load_model, resolve
from arbq.stages import calibrate as cal
from arbq.stages.fake_model import write_fake_model
from arbq.stages.run_dir import RUN_FORMAT, RunDir

console = Console(stderr=True)


def parse_layers(spec: str | None, num_layers: int) -> range:
    """'A:B' → range(A, B) (either side may be empty); None → all layers."""
    if not spec:
        return range(num_layers)
    try:
        a, b = spec.split(":")
        r = range(int(a) if a else 0, int(b) if b else num_layers)
    except ValueError:
        raise ArbqError(f"--layers must look like A:B, got {spec!r}") from None
    if not (0 <= r.start < r.stop <= num_layers):
        raise ArbqError(f"--layers {spec} is outside 0:{num_layers}")
    return r


def _prepare_calib(run: RunDir, model: str, calib: Path | None, cfg: BinarizeConfig, **calib_args) -> Path:
    if calib is not None:
        if not (Path(calib) / "manifest.json").is_file():
            raise ArbqError(f"--calib {calib} is not a calibration dir (no manifest.json)")
        if not cal.is_complete(Path(calib)):
            raise ArbqError(f"--calib {calib} is incomplete; finish it with `arbq calibrate --resume`")
        return Path(calib)
    target = run.root / "calib"
    if not cal.is_complete(target):
        cal.run_calibrate(model, target, stats=not cfg.sequential, resume=(target / "manifest.json").is_file(),
                          **calib_args)
    return target


def _check_run(run: RunDir, info: dict, resume: bool) -> None:
    if run.run_json.is_file():
        old = run.info()
        if not resume:
            raise ArbqError(f"{run.root} already holds a run; pass --resume to continue it or choose a new -o")
        for key in ("model", "recipe", "calib"):
            if old.get(key) != info.get(key):
                raise ArbqError(f"cannot resume {run.root}: its {key} differs ({old.get(key)} vs {info.get(key)})")


def run_binarize(model: str, out: Path, cfg: BinarizeConfig, calib: Path | None = None, data: str = "wikitext2",
                 nsamples: int = 128, seqlen: int = 2048, seed: int = 0, layers: str | None = None,
                 device: str = "cpu", resume: bool = False) -> list[dict]:
    """Binarize `model` into the run dir `out`; returns the report rows."""
    run = RunDir(Path(out))
    ref = resolve(model)
    spec = archmod.arch_for(load_config(ref).model_type)
    if layers and cfg.sequential:
        raise ArbqError("--layers needs --no-sequential (sequential layers depend on the ones before)")
    calib_dir = _prepare_calib(run, model, calib, cfg, data=data, nsamples=nsamples, seqlen=seqlen, seed=seed,
                               device=device)
    samples, manifest = cal.load_samples(calib_dir)
    net, _ = load_model(ref)
    if int(samples.max()) >= net.config.vocab_size:
        raise ArbqError(f"calibration {calib_dir} has token ids beyond this model's vocabulary "
                        f"({int(samples.max())} >= {net.config.vocab_size}): it was made for another tokenizer")
    blocks = archmod.decoder_layers(net, spec)
    todo_range = parse_layers(layers, len(blocks))
    info = {"format": RUN_FORMAT, "model": str(ref), "model_type": net.config.model_type,
            "num_layers": len(blocks), "linears": list(spec.linears), "groups": [list(g) for g in spec.groups],
            "recipe": cfg.to_dict(), "calib": {"dir": str(calib_dir),
                                                "manifest_sha256": sha256_file(calib_dir / "manifest.json"),
                                                "params": manifest.get("params")}}
    _check_run(run, info, resume)
    write_json(run.run_json, {**info, "layers": [todo_range.start, todo_range.stop]})
    missing = [i for i in todo_range if not run.layer_complete(i)]
    t_start = time.perf_counter()
    if missing:
        console.print(f"binarize {ref} with {cfg.method}{'+cgb' if cfg.cgb else ''}: layers "
                      f"{missing[0]}..{todo_range.stop - 1} of {len(blocks)} "
                      f"({len(todo_range) - len(missing)} already done); embeddings, norms and lm_head stay "
                      f"full precision")
        if cfg.sequential:
            _sequential(net, spec, blocks, samples, run, cfg, missing, device)
        else:
            _independent(blocks, spec, calib_dir, run, cfg, missing, device)
    rows = run.rebuild_report(len(blocks))
    if all(run.layer_complete(i) for i in range(len(blocks))) and not (run.fake_dir / "config.json").is_file():
        write_fake_model(ref, run, spec)
    console.print(f"done in {time.perf_counter() - t_start:.1f} s → {run.root}")
    return rows


def _apply(layer, lin: dict[str, torch.nn.Linear], results: dict[str, LinearResult]) -> None:
    for name, res in results.items():
        w = lin[name].weight
        w.data.copy_(res.dequantize().to(w.dtype))


def _binarize_layer(i: int, layer, spec, hess_for, cfg: BinarizeConfig, device: str, prog, task
                    ) -> tuple[dict[str, LinearResult], list[dict]]:
    """Binarize the linears of layer i in true-sequential group order. hess_for(group) → {name: H}."""
    lin = archmod.layer_linears(layer, spec)
    results, rows = {}, []
    for group in spec.groups:
        hess = hess_for(group)
        for name in group:
            prog.update(task, description=f"layer {i} {name}")
            res, row = binarize_linear(lin[name].weight.data.to(device), hess[name].to(device), cfg,
                                       name=f"layer {i} {name}")
            res = LinearResult(**{k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                  for k, v in res.__dict__.items()})
            results[name] = res
            rows.append({"layer": i, **row, "module": name})
            lin[name].weight.data.copy_(res.dequantize().to(lin[name].weight.dtype))
    return results, rows


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)


def _hessian_source(layer, lin, spec, x, kwargs, device: str, i: int, true_sequential: bool):
    """hess_for(group) → {name: H}: per group from the partly binarized layer (true-sequential),
    or every group from one full-precision pass (the reference's order)."""
    if true_sequential:
        def per_group(group):
            h, _ = layerwise.accumulate_hessians(layer, {group[0]: lin[group[0]]}, x, kwargs, device,
                                                 name=f"layer {i}")
            return {n: h[group[0]] for n in group}
        return per_group
    h, _ = layerwise.accumulate_hessians(layer, {g[0]: lin[g[0]] for g in spec.groups}, x, kwargs, device,
                                         name=f"layer {i}")
    full = {n: h[g[0]] for g in spec.groups for n in g}
    return lambda group: full


def _sequential(net, spec, blocks, samples, run: RunDir, cfg: BinarizeConfig, missing: list[int],
                device: str) -> None:
    x, kwargs = layerwise.capture_inputs(net, blocks, samples)
    with _progress() as prog:
        task = prog.add_task("binarize", total=len(blocks))
        for i, layer in enumerate(blocks):
            dtype = next(layer.parameters()).dtype
            layer.to(device, torch.float32)
            lin = archmod.layer_linears(layer, spec)
            if i not in missing:
                _apply(layer, lin, run.read_layer(i, list(spec.linears)))
            else:
                hess_for = _hessian_source(layer, lin, spec, x, kwargs, device, i, cfg.true_sequential)
                results, rows = _binarize_layer(i, layer, spec, hess_for, cfg, device, prog, task)
                run.write_layer(i, results, rows)
            if i < len(blocks) - 1:
                x = layerwise.forward_layer(layer, x, kwargs, device, name=f"layer {i}")
            layer.to("cpu", dtype)
            prog.advance(task)


def _independent(blocks, spec, calib_dir: Path, run: RunDir, cfg: BinarizeConfig, missing: list[int],
                 device: str) -> None:
    with _progress() as prog:
        task = prog.add_task("binarize", total=len(missing))
        for i in missing:
            full = cal.load_layer_stats(calib_dir, i, spec.groups)
            dtype = next(blocks[i].parameters()).dtype
            layer = blocks[i].to(device, torch.float32)
            results, rows = _binarize_layer(i, layer, spec, lambda group, full=full: full, cfg, device, prog, task)
            layer.to("cpu", dtype)
            run.write_layer(i, results, rows)
            prog.advance(task)
