"""`arbq binarize`: binarize every decoder layer's linears, one layer at a time, resumably.

Sequential (default, as the paper): layer i is binarized from the activations that went through the
already-binarized layers 0..i-1, re-running each finished layer once on the calibration samples.
`--no-sequential` takes each layer's Hessians from `calibrate`'s stored statistics instead; layers
are then independent, so `--layers A:B` can shard the job across machines.
Files: see `arbq.stages.run_dir`. Each layer file is written atomically; `--resume` starts at the
first layer without a complete file and reproduces an uninterrupted run bit for bit.
Memory: a safetensors model is read one decoder layer at a time (arbq.models.lazy) and model-fake/ is
streamed tensor by tensor; sequential activations live on the device, in CPU memory or on disk.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from arbq.errors import ArbqError
from arbq.fileio import output_lock, sha256_file, write_json
from arbq.methods import reconstruct
from arbq.methods.config import BinarizeConfig
from arbq.methods.registry import get_method
from arbq.models import arch as archmod
from arbq.models import layerwise, moe
from arbq.models.activations import check_offload, scratch
from arbq.models.lazy import LayerwiseModel, open_layerwise
from arbq.models.loading import check_device, load_config, resolve
from arbq.packed.layouts import layout_of
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
    if (target / "manifest.json").is_file() or not cal.is_complete(target):   # a resume checks the settings:
        cal.run_calibrate(model, target, stats=not cfg.sequential or cfg.needs_layer_scores,  # other --data/--seed
                          resume=(target / "manifest.json").is_file(), **calib_args)   # or model: refused
    return target


def _hessian_dtype(cfg: BinarizeConfig, flag: str | None, manifest: dict, calib_dir: Path) -> str:
    """The dtype Hessians are summed in: the flag (float32 by default) when sequential; with
    --no-sequential the statistics come from `calibrate`, so it is the calibration's."""
    if cfg.sequential:
        name = flag or "float32"
    else:
        name = (manifest.get("params") or {}).get("hessian_dtype", "float32")
        if flag is not None and flag != name:
            raise ArbqError(f"--hessian-dtype {flag} differs from the statistics in {calib_dir} ({name}); "
                            f"recalibrate with `arbq calibrate --hessian-dtype {flag}`")
    layerwise.hessian_dtype(name)
    return name


def _with_layer_plan(cfg: BinarizeConfig, calib_dir: Path, spec, num_layers: int
                     ) -> tuple[BinarizeConfig, dict | None]:
    """The recipe with its method's per-layer plan (e.g. CFS's N per layer, arbq.methods.cfs) written out as
    overrides of the modules that use the method, placed before the recipe's own overrides (which win), and
    the whole-run key that asked for it reset (the resolved recipe is what run.json records; a resume
    resolves the same). Returns (recipe, {"influence", "layers"} or None)."""
    rec = get_method(cfg.method)
    scores: list[float] = []

    def influence() -> list[float]:
        scores[:] = cal.load_influence(calib_dir, num_layers)
        return scores

    plan = rec.layer_plan(cfg, influence) if rec.layer_plan else None
    if not plan:
        return cfg, None
    added = []
    for i, keys in enumerate(plan):
        names = [f"{spec.layers}.{i}.{name}" for name in spec.linears]
        targets = [n for n in names if (c := cfg.for_module(n)) is not None and c.method == cfg.method]
        if targets and keys:
            added.append({"targets": targets, **keys})
    resolved = cfg.replace(overrides=(*added, *cfg.overrides), nm_cfs=0)
    return resolved, {"influence": scores, "layers": plan, "spread": cfg.nm_cfs}


def _check_run(run: RunDir, info: dict, resume: bool) -> None:
    if run.run_json.is_file():
        old = {"hessian_dtype": "float32", **run.info()}
        if isinstance(old.get("recipe"), dict):   # a run made before a recipe key was added has its default
            try:
                old["recipe"] = BinarizeConfig.from_dict(old["recipe"]).to_dict()
            except ArbqError:
                pass
        if not resume:
            raise ArbqError(f"{run.root} already holds a run; pass --resume to continue it or choose a new -o")
        for key in ("model", "recipe", "calib", "hessian_dtype"):
            if old.get(key) != info.get(key):
                diff = _difference(old.get(key), info.get(key))
                raise ArbqError(f"cannot resume {run.root}: its {key} differs ({diff})")
        cal.check_identity(run.root, old.get("model_identity"), info["model_identity"])


def _difference(old, new) -> str:
    """"A vs B", or for two recipes only the keys that differ: "compensation: diagonal vs exact"."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return "; ".join(f"{k}: {old.get(k)} vs {new.get(k)}" for k in keys)
    return f"{old} vs {new}"


def run_binarize(model: str, out: Path, *args, **kwargs) -> list[dict]:
    """`_run_binarize` holding the run dir's lock: a second writer of the same RUN (a requeued task while
    the first still runs) is refused, and scratch left by a killed run is removed first."""
    with output_lock(Path(out)):
        return _run_binarize(model, out, *args, **kwargs)


def _run_binarize(model: str, out: Path, cfg: BinarizeConfig, calib: Path | None = None, data: str = "wikitext2",
                 nsamples: int = 128, seqlen: int = 2048, seed: int = 0, layers: str | None = None,
                 device: str = "cpu", resume: bool = False, offload: str = "cpu", hessian_dtype: str | None = None,
                 lazy: bool = True) -> list[dict]:
    """Binarize `model` into the run dir `out`; returns the report rows. hessian_dtype None: float32 (or,
    with --no-sequential, the calibration's)."""
    run = RunDir(Path(out))
    ref = resolve(model)
    check_device(device)
    check_offload(offload)
    config = load_config(ref)
    spec = archmod.arch_for(config.model_type, config)
    if layers and cfg.sequential:
        raise ArbqError("--layers needs --no-sequential (sequential layers depend on the ones before)")
    if hessian_dtype is not None:
        layerwise.hessian_dtype(hessian_dtype)
    calib_dir = _prepare_calib(run, model, calib, cfg, data=data, nsamples=nsamples, seqlen=seqlen, seed=seed,
                               device=device, offload=offload, hessian_dtype=hessian_dtype or "float32", lazy=lazy)
    samples, manifest = cal.load_samples(calib_dir)
    hname = _hessian_dtype(cfg, hessian_dtype, manifest, calib_dir)
    net = open_layerwise(ref, lazy=lazy)
    vocab = net.config.get_text_config().vocab_size          # a multimodal config keeps it in its text config
    if int(samples.max()) >= vocab:
        raise ArbqError(f"calibration {calib_dir} has token ids beyond this model's vocabulary "
                        f"({int(samples.max())} >= {vocab}): it was made for another tokenizer")
    cfg, plan = _with_layer_plan(cfg, calib_dir, spec, len(net))
    cfg.check_modules([f"{spec.layers}.{i}.{name}" for i in range(len(net)) for name in spec.linears])
    todo_range = parse_layers(layers, len(net))
    info = {"format": RUN_FORMAT, "model": str(ref), "model_identity": cal.model_identity(ref, net.config),
            "model_type": net.config.model_type,
            "num_layers": len(net), "linears": list(spec.linears), "groups": [list(g) for g in spec.groups],
            "recipe": cfg.to_dict(), "hessian_dtype": hname,
            "calib": {"dir": str(calib_dir), "manifest_sha256": sha256_file(calib_dir / "manifest.json"),
                      "params": manifest.get("params")}}
    if plan is not None:
        info["layer_plan"] = plan
    _check_run(run, info, resume)
    runtime = {"device": device, "offload_activations": offload, "lazy": net.lazy}
    write_json(run.run_json, {**info, "layers": [todo_range.start, todo_range.stop], "runtime": runtime})
    missing = [i for i in todo_range if not run.layer_complete(i)]
    t_start = time.perf_counter()
    if missing:
        console.print(f"binarize {ref} with {cfg.label()}: layers "
                      f"{missing[0]}..{todo_range.stop - 1} of {len(net)} "
                      f"({len(todo_range) - len(missing)} already done); embeddings, norms and lm_head stay "
                      f"full precision")
        if cfg.sequential:
            _sequential(net, samples, run, cfg, missing, device, offload, layerwise.hessian_dtype(hname))
        else:
            _independent(net, calib_dir, run, cfg, missing, device)
    rows = run.rebuild_report(len(net))
    # model-fake is (re)written when the last layer is done and whenever this call binarized a layer
    done = all(run.layer_complete(i) for i in range(len(net)))
    if done and (missing or not (run.fake_dir / "config.json").is_file()):
        write_fake_model(ref, run, spec, net=net if net.lazy else None)
    console.print(f"done in {time.perf_counter() - t_start:.1f} s → {run.root}")
    return rows


def _apply(layer, lin: dict[str, torch.nn.Linear], results: dict) -> None:
    for name, res in results.items():
        w = lin[name].weight
        w.data.copy_(res.dequantize().to(w.dtype))


def _binarize_layer(i: int, layer, spec, hess_for, cfg: BinarizeConfig, device: str, prog, task
                    ) -> tuple[dict, list[dict], dict[str, str]]:
    """Quantize the linears of layer i in true-sequential group order, each with the method its recipe
    settings name (`cfg.for_module`; ignored ones stay full precision). hess_for(group) → {name: H};
    its optional attribute `report` {name: fields} adds fields to a linear's report row (an expert's index,
    routed tokens and Hessian rule). Returns (linear -> result, report rows, linear -> method)."""
    lin = archmod.layer_linears(layer, spec)
    results, rows, methods = {}, [], {}
    for group in spec.groups:
        todo = {name: cfg.for_module(f"{spec.layers}.{i}.{name}") for name in group}
        todo = {name: c for name, c in todo.items() if c is not None}
        if not todo:
            continue
        hess = hess_for(group)
        for name, cfg_m in todo.items():
            prog.update(task, description=f"layer {i} {name}")
            res, row = get_method(cfg_m.method).fit(lin[name].weight.data.to(device), hess[name].to(device), cfg_m,
                                                    f"layer {i} {name}")
            results[name], methods[name] = res.to("cpu"), cfg_m.method
            rows.append({"layer": i, **row, "module": name, "method": cfg_m.label(),
                         **getattr(hess_for, "report", {}).get(name, {})})
            lin[name].weight.data.copy_(results[name].dequantize().to(lin[name].weight.dtype))
    return results, rows, methods


def _tune(i: int, layer, spec, lin, results: dict, rows: list[dict], x, target, kwargs, cfg: BinarizeConfig,
          device: str) -> tuple[dict, list[dict]]:
    """Block-wise reconstruction of layer i's values (arbq.methods.reconstruct) on the calibration inputs x and
    the full-precision outputs `target` (tune_target "layer": the FP layer on x; "model": the FP model's own
    layer-i outputs, so a layer also makes up for the error of the layers before it); every report row of the
    layer gets the relative output error before and after."""
    dtype = next(layer.parameters()).dtype
    store = {}
    for n in results:
        c = cfg.for_module(f"{spec.layers}.{i}.{n}")
        rec = get_method(c.method)
        if (fn := layout_of(rec.layout).stored_values) is not None:
            store[n] = partial(fn, params=rec.layout_params(c), scale_dtype=c.scale_dtype)

    def sample(s: int):
        return x.get(s)[None].to(device, dtype), target.get(s)[None].to(device, dtype)

    results, info = reconstruct.tune_layer(layer, lin, results, store, len(x), sample,
                                           layerwise.call_kwargs(layer, kwargs, device),
                                           reconstruct.TuneSettings(cfg.tune_epochs, cfg.tune_lr, seed=i),
                                           name=f"layer {i}")
    extra = {"tune_loss_before": round(info["loss_before"], 6), "tune_loss_after": round(info["loss_after"], 6),
             "tune_seconds": round(info["seconds"], 2)}
    return results, [{**r, **extra} for r in rows]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=True)


def _hessian_source(layer, lin, spec, x, kwargs, device: str, i: int, true_sequential: bool, dtype: torch.dtype):
    """hess_for(group) → {name: H}: per group from the partly binarized layer (true-sequential),
    or every group from one full-precision pass (the reference's order).
    MoE layers: experts' Hessians from the tokens routed to each (moe.accumulate_expert_hessians); true-
    sequential takes every expert's gate/up Hessian in one pass once the dense groups before are done,
    and every expert's down Hessian in one more pass once all gate/up are binarized. hess_for.report
    {expert linear: {"expert", "tokens", "hessian"}} is filled as Hessians are computed."""
    report: dict[str, dict] = {}
    dense_groups = [g for g in spec.groups if not archmod.is_expert(spec, g[0])]

    def collect(groups, projections: tuple[str, ...]) -> dict[str, torch.Tensor]:
        reps = {g[0]: lin[g[0]] for g in groups}
        if projections:
            stats, _ = moe.accumulate_expert_hessians(layer, spec.moe, x, kwargs, device, dtype, name=f"layer {i}",
                                                      projections=projections, dense=reps, keep=False)
            report.update({n: moe.expert_report(stats, n) for n, r in stats.rule.items() if r != "dense"})
            h = stats.hessians
        else:
            h, _ = layerwise.accumulate_hessians(layer, reps, x, kwargs, device, dtype, name=f"layer {i}", keep=False)
        out = {n: h[g[0]] for g in groups for n in g}
        out.update({n: t for n, t in h.items() if archmod.is_expert(spec, n)})
        return out

    if true_sequential:
        cache: dict[str, dict] = {}

        def per_group(group):
            if not archmod.is_expert(spec, group[0]):
                return collect([group], ())
            proj = "down_proj" if group[0].endswith(".down_proj") else "gate_proj"
            if proj not in cache:
                cache[proj] = collect([], (proj,))
            return cache[proj]
        per_group.report = report
        return per_group
    full = collect(dense_groups, ("gate_proj", "down_proj") if spec.moe is not None else ())

    def every(group):
        return full
    every.report = report
    return every


def _sequential(net: LayerwiseModel, samples, run: RunDir, cfg: BinarizeConfig, missing: list[int],
                device: str, offload: str, hdtype: torch.dtype) -> None:
    spec = net.spec
    with scratch(run.root, offload, device) as acts, _progress() as prog:
        x, kwargs = net.layer0_inputs(samples, device, acts.new(len(samples)))
        x_fp = None                          # tune_target "model": the full-precision model's own stream
        if cfg.tune_epochs and cfg.tune_target == "model":
            x_fp = acts.new(len(samples))
            for s in range(len(samples)):
                x_fp.put(s, x.get(s))
        task = prog.add_task("binarize", total=len(net))
        for i in range(len(net)):
            layer = net.load_layer(i, device)
            lin = archmod.layer_linears(layer, spec)
            y_fp = None
            if x_fp is not None and any(j >= i for j in missing):
                y_fp = layerwise.forward_layer(layer, x_fp, kwargs, device, name=f"layer {i}",
                                               out=acts.new(len(samples)))
            if i not in missing:
                _apply(layer, lin, run.read_layer(i, list(spec.linears)))
            else:
                target = y_fp
                if target is None and cfg.tune_epochs:          # tune_target "layer": FP layer, same inputs
                    target = layerwise.forward_layer(layer, x, kwargs, device, name=f"layer {i}",
                                                     out=acts.new(len(samples)))
                hess_for = _hessian_source(layer, lin, spec, x, kwargs, device, i, cfg.true_sequential, hdtype)
                results, rows, methods = _binarize_layer(i, layer, spec, hess_for, cfg, device, prog, task)
                if target is not None:
                    prog.update(task, description=f"layer {i} reconstruction")
                    results, rows = _tune(i, layer, spec, lin, results, rows, x, target, kwargs, cfg, device)
                    if target is not y_fp:
                        target.close()
                run.write_layer(i, results, rows, methods)
            if i < len(net) - 1:
                y = layerwise.forward_layer(layer, x, kwargs, device, name=f"layer {i}", out=acts.new(len(samples)))
                x.close()
                x = y
            if x_fp is not None:
                x_fp.close()
                x_fp = y_fp
            net.free_layer(i)
            prog.advance(task)


def _independent(net: LayerwiseModel, calib_dir: Path, run: RunDir, cfg: BinarizeConfig, missing: list[int],
                 device: str) -> None:
    with _progress() as prog:
        task = prog.add_task("binarize", total=len(missing))
        for i in missing:
            full = cal.load_layer_stats(calib_dir, i, net.spec.groups)

            def stored(group, full=full):
                return full
            stored.report = cal.load_expert_report(calib_dir, i, net.spec.groups)   # MoE: tokens, rule per expert
            layer = net.load_layer(i, device)
            results, rows, methods = _binarize_layer(i, layer, net.spec, stored, cfg, device, prog, task)
            net.free_layer(i)
            run.write_layer(i, results, rows, methods)
            prog.advance(task)
