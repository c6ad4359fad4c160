"""Zero-shot tasks through lm-evaluation-harness, on a model that is already loaded.

A task is a registered lm-eval name (piqa, arc_easy, ...) or a local task YAML file: its
directory is added to lm-eval's include path and the task name is read from the YAML's `task:`.
Results keep the accuracy metrics: acc and acc_norm, each with its standard error
(stderr = sqrt(p(1-p)/(n-1)) over the n evaluated examples, lm-eval's `mean` aggregation).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from arbq.errors import ArbqError

METRICS = ("acc", "acc_norm")
SHIPPED_TASKS = Path(__file__).resolve().parents[1] / "recipes" / "tasks"   # offline tasks arbq ships


class _TaskYamlLoader(yaml.SafeLoader):
    """SafeLoader that reads lm-eval's `!function mod.fn` tags as plain strings."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def task_name_from_yaml(path: Path) -> str:
    """The `task:` (or `group:`) name declared by a task YAML file."""
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ArbqError(f"cannot read task YAML {path}: {_first_line(e)}") from None
    name = (cfg.get("task") or cfg.get("group")) if isinstance(cfg, dict) else None
    if not isinstance(name, str):
        raise ArbqError(f"task YAML {path} has no 'task:' name")
    return name


def resolve_tasks(specs: list[str], include_path: Path | None) -> tuple[list[str], list[str]]:
    """(task names, include dirs): YAML paths become their task name plus their directory."""
    names: list[str] = []
    dirs: list[str] = []
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ArbqError(f"--include-path is not a directory: {include_path}")
        dirs.append(str(Path(include_path).resolve()))
    for spec in specs:
        p = Path(spec).expanduser()
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise ArbqError(f"task YAML not found: {spec}")
            names.append(task_name_from_yaml(p))
            d = str(p.resolve().parent)
            if d not in dirs:
                dirs.append(d)
        else:
            names.append(spec)
            shipped = SHIPPED_TASKS / f"{spec}.yaml"
            if shipped.is_file() and str(SHIPPED_TASKS) not in dirs:   # `--tasks botchan_cloze`
                dirs.append(str(SHIPPED_TASKS))
    return names, dirs


def _extract(results: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
    """Rows {task, metric, value, stderr, n, limit, num_fewshot} for the accuracy metrics."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, res in results["results"].items():
        n = n_samples.get(task, {}).get("effective")
        for metric in METRICS:
            key = f"{metric},none"
            if key not in res:
                continue
            stderr = res.get(f"{metric}_stderr,none")
            rows.append({"task": task, "metric": metric, "value": float(res[key]),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": n, "limit": limit, "num_fewshot": results.get("n-shot", {}).get(task, 0)})
    return rows


def run_tasks(model: nn.Module, tokenizer, specs: list[str], include_path: Path | None = None,
              limit: int | None = None, batch_size: int = 1) -> list[dict[str, Any]]:
    """Evaluate `model` zero-shot on lm-eval tasks; returns one row per (task, accuracy metric)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise ArbqError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise ArbqError(f"--batch-size must be at least 1 (got {batch_size})")
    names, dirs = resolve_tasks(specs, include_path)
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # silence "pretrained is not a str", "custom kwargs" and similar notices
    try:
        tm = TaskManager(include_path=dirs or None)
        unknown = [n for n in names if n not in tm.all_tasks]
        if unknown:
            raise ArbqError(f"unknown lm-eval task(s): {', '.join(unknown)} "
                            "(give a registered name or a task YAML path)")
        try:  # builds the tasks and fetches their datasets (hub, cache or local files)
            tasks = list(tm.load(names)["tasks"].values())
        except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
            raise ArbqError(f"could not load lm-eval task(s) {', '.join(names)}: {_first_line(e)}") from None
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit,
                                      log_samples=False, verbosity="ERROR")
    finally:
        log.setLevel(level)
    return _extract(out, limit)
