"""The arbq stages the benchmark drives: one calibration, `arbq binarize` per run (a measured
subprocess), `run_pack` per run. Everything lands in a work dir and is reused when it is finished:

    WORK/calib/                  arbq calibrate output (shared by every run: same samples for all)
    WORK/runs/NAME/              arbq binarize run dir; finished when model-fake/config.json exists
    WORK/runs/NAME.cost.json     bench.measure record of the binarize subprocess (wall, peak RSS)
    WORK/recipes/NAME.yaml       recipe file, when a run needs a key that has no CLI flag
    WORK/packed/NAME/            arbq pack output; WORK/packed/NAME.size.json its size report
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from arbq.errors import ArbqError
from arbq.fileio import read_json, write_json
from bench.methods import RunSpec

REPO = Path(__file__).resolve().parents[1]
console = Console(stderr=True)


def calibrate(model: str, work: Path, data: str, nsamples: int, seqlen: int, seed: int, stats: bool,
              device: str) -> dict:
    """Calibrate once into WORK/calib (reused when complete); returns {dir, params, wall_s, reused}."""
    from arbq.stages.calibrate import run_calibrate

    out = work / "calib"
    manifest = out / "manifest.json"
    t0 = time.perf_counter()
    done = manifest.is_file() and read_json(manifest).get("complete")
    if not done:
        run_calibrate(model, out, data=data, nsamples=nsamples, seqlen=seqlen, seed=seed, stats=stats,
                      resume=manifest.is_file(), device=device)
    return {"dir": str(out), "params": read_json(manifest)["params"], "reused": bool(done),
            "wall_s": round(time.perf_counter() - t0, 2)}


def run_dir(work: Path, name: str) -> Path:
    return work / "runs" / name


def finished(run: Path) -> bool:
    return (run / "model-fake" / "config.json").is_file()


def binarize(spec: RunSpec, model: str, work: Path, calib: Path, device: str, threads: int | None) -> dict:
    """Binarize `spec` unless its run dir is finished; returns its cost row (binarize/NAME/...)."""
    run, cost_file = run_dir(work, spec.name), work / "runs" / f"{spec.name}.cost.json"
    want = spec.config().to_dict()
    if (run / "run.json").is_file() and read_json(run / "run.json").get("recipe") != want:
        raise ArbqError(f"{run} was binarized with another recipe than {spec.name} now means; "
                        "delete it or choose another --out")
    args = ["binarize", model, *spec.binarize_args(work / "recipes"), "--calib", str(calib), "-o", str(run),
            "--device", device]
    resumed = (run / "run.json").is_file() and not finished(run)
    if not finished(run):
        args += ["--resume"] if resumed else []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        console.print(f"[bold]bench: arbq {' '.join(args)}")
        proc = subprocess.run([sys.executable, "-m", "bench.measure", "--json", str(cost_file), "--", *args],
                              env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        if proc.returncode != 0 or not finished(run):
            raise ArbqError(f"arbq binarize for {spec.name} failed (exit {proc.returncode}); see the error above")
        cost = {**read_json(cost_file), "resumed": resumed, "reused": False}
        write_json(cost_file, cost)
    elif cost_file.is_file():
        cost = {**read_json(cost_file), "reused": True}
    else:  # finished by someone else: no measurement
        cost = {"argv": None, "wall_s": None, "peak_rss_mb": None, "peak_gpu_mb": None, "reused": True}
    rows = [json.loads(line) for line in (run / "report.jsonl").read_text().splitlines() if line.strip()]
    per_layer: dict[int, float] = {}
    for r in rows:
        per_layer[r["layer"]] = per_layer.get(r["layer"], 0.0) + r.get("seconds", 0.0)
    return {"run": str(run), "recipe": want, "command": " ".join(cost["argv"] or args),
            "wall_s": cost.get("wall_s"), "peak_rss_mb": cost.get("peak_rss_mb"),
            "peak_gpu_mb": cost.get("peak_gpu_mb"), "resumed": cost.get("resumed", False),
            "reused": cost["reused"], "layers": len(per_layer),
            "layer_avg_s": sum(per_layer.values()) / max(len(per_layer), 1)}


def pack(name: str, work: Path, scale_dtype: str | None = None) -> dict:
    """Pack a finished run (reused when the size report is newer than the run); returns size/NAME/...
    scale_dtype: None = the recipe's; otherwise packed into packed/NAME-SCALEDTYPE."""
    from arbq.stages.pack import run_pack

    tag = name if scale_dtype is None else f"{name}-{scale_dtype}"
    run, out = run_dir(work, name), work / "packed" / tag
    size_file = work / "packed" / f"{tag}.size.json"
    fresh = size_file.is_file() and (out / "config.json").is_file() and \
        size_file.stat().st_mtime >= (run / "model-fake" / "config.json").stat().st_mtime
    rep = read_json(size_file) if fresh else run_pack([run], out, scale_dtype=scale_dtype, json_out=size_file)
    b, m = rep["binarized"], rep["model"]
    dir_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"packed_dir": str(out), "scale_dtype": rep.get("scale_dtype"), "dtype": rep.get("dtype"),
            "bits_per_weight": b["bpw_honest"], "bits_per_weight_paper": b["bpw_paper"],
            "bits_by_component": {k: v for k, v in b["bpw_measured"].items() if v},
            "binarized_weights": b["weights"], "model_params": m["params"],
            "model_bits_per_param": m["bits_per_param"], "packed_weights_mb": m["packed_bytes"] / 2**20,
            "packed_dir_mb": dir_bytes / 2**20, "fp16_mb": m["fp16_bytes"] / 2**20,
            "compression_vs_fp16": m["fp16_bytes"] / max(m["packed_bytes"], 1)}
