"""`arbq eval`: perplexity (GPTQ protocol) and zero-shot lm-eval tasks for any model arbq can read.

MODEL is a Hugging Face dir, hub id, .gguf file, RUN/model-fake, or a packed arbq dir (its
config.json has `quantization_config.quant_method == "arbq"`, read by `arbq.packed.load`).
Named texts are evaluated on their test split (wikitext2 test; ptb and c4 validation, as GPTQ).

Results (returned, printed as tables, and written with --json):

    {"model": str, "device": str,
     "perplexity": [{"text", "split", "protocol", "seqlen", "windows", "tokens", "text_tokens",
                     "max_windows", "nll", "ppl"}, ...],
     "tasks": [{"task", "metric", "value", "stderr", "n", "limit", "num_fewshot"}, ...],
     "versions": {...}}
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from arbq.data import NAMED, load_text, tokenize
from arbq.errors import ArbqError
from arbq.fileio import library_versions, write_json
from arbq.models.loading import ModelRef, check_device, load_model, load_tokenizer, max_context, resolve
from arbq.stages.perplexity import PROTOCOL, perplexity

EVAL_SPLIT = "test"


def load_for_eval(model: str, device: str = "cpu", resident: bool = True) -> tuple[nn.Module, Any]:
    """(model in eval mode on `device`, tokenizer). HF models load in float32; a packed dir through arbq.packed.load
    (`resident`: on the CPU, its linears held in the kernel's own layout)."""
    dev = check_device(device)
    path = Path(model).expanduser()
    from arbq.packed.loader import is_packed

    if path.is_dir() and is_packed(path):
        from arbq import packed

        loaded = packed.load(path, device=device, resident=resident)
        net, tok = loaded if isinstance(loaded, tuple) else (loaded, None)
        if tok is None:
            tok = load_tokenizer(ModelRef(str(path)))
        return net.eval(), tok
    ref = resolve(model)
    tok = load_tokenizer(ref)
    net, _ = load_model(ref, dtype=torch.float32)
    return net.to(dev), tok


def eval_perplexity(net: nn.Module, tok, spec: str, seqlen: int, max_windows: int | None,
                    console: Console | None = None) -> dict[str, Any]:
    """One perplexity row for text `spec` (named set or PATH[@A:B]); see the module docstring."""
    ctx = max_context(getattr(net, "config", None))
    if ctx is not None and seqlen > ctx:
        raise ArbqError(f"--seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    if max_windows is not None and max_windows < 1:
        raise ArbqError(f"--max-windows must be at least 1 (got {max_windows})")
    ids = tokenize(tok, load_text(spec, split=EVAL_SPLIT))
    if ids.numel() < seqlen:
        raise ArbqError(f"text {spec} is shorter than one window: {ids.numel()} tokens < --seqlen {seqlen}")
    t0 = time.perf_counter()
    if console is None:
        res = perplexity(net, ids, seqlen, max_windows=max_windows)
    else:
        with console.status(f"perplexity of {spec}") as status:
            res = perplexity(net, ids, seqlen, max_windows=max_windows,
                             progress=lambda i, n: status.update(f"perplexity of {spec}: window {i}/{n}"))
    return {"text": spec, "split": EVAL_SPLIT if spec in NAMED else "file", "protocol": PROTOCOL,
            "seqlen": seqlen, "windows": res.windows, "tokens": res.tokens, "text_tokens": int(ids.numel()),
            "max_windows": max_windows, "nll": sum(res.nlls) / res.windows, "ppl": res.ppl,
            "seconds": round(time.perf_counter() - t0, 3)}


def render(results: dict[str, Any], console: Console) -> None:
    """Print the perplexity and task tables."""
    if results["perplexity"]:
        t = Table(title=f"Perplexity — {results['model']}")
        for col in ("text", "protocol", "seqlen", "windows", "tokens", "ppl"):
            t.add_column(col, justify="left" if col in ("text", "protocol") else "right", overflow="fold")
        for r in results["perplexity"]:
            t.add_row(r["text"], r["protocol"], str(r["seqlen"]), str(r["windows"]), str(r["tokens"]),
                      f"{r['ppl']:.4f}")
        console.print(t)
    if results["tasks"]:
        t = Table(title=f"Zero-shot (lm-eval) — {results['model']}")
        for col in ("task", "metric", "value", "n"):
            t.add_column(col, justify="left" if col in ("task", "metric") else "right")
        for r in results["tasks"]:
            err = f" ± {r['stderr']:.4f}" if r["stderr"] is not None else ""
            t.add_row(r["task"], r["metric"], f"{r['value']:.4f}{err}", str(r["n"]))
        console.print(t)


def run_eval(model: str, ppl: list[str], tasks: list[str], include_path: Path | None = None,
             seqlen: int = 2048, max_windows: int | None = None, limit: int | None = None,
             batch_size: int = 1, device: str = "cpu", json_out: Path | None = None,
             console: Console | None = None, resident: bool = True) -> dict[str, Any]:
    """Evaluate MODEL on every text in `ppl` and every lm-eval task in `tasks`; see module docstring.

    Tables go to `console` (stdout by default); `json_out` is written atomically.
    """
    if not ppl and not tasks:
        raise ArbqError("nothing to evaluate: give --ppl texts and/or --tasks")
    acts_on = (("--limit", limit, "--tasks", tasks), ("--include-path", include_path, "--tasks", tasks),
               ("--max-windows", max_windows, "--ppl texts", ppl))
    for flag, value, what, given in acts_on:
        if value is not None and not given:
            raise ArbqError(f"{flag} acts on {what}, and none were given")
    console = console or Console()
    net, tok = load_for_eval(model, device, resident)
    spinner = Console(stderr=True)  # progress (drawn only on a terminal)
    results: dict[str, Any] = {"model": model, "device": device, "perplexity": [], "tasks": [],
                               "versions": library_versions()}
    for spec in ppl:
        results["perplexity"].append(eval_perplexity(net, tok, spec, seqlen, max_windows, spinner))
    if tasks:
        from arbq.stages.zeroshot import run_tasks

        results["tasks"] = run_tasks(net, tok, tasks, include_path=include_path, limit=limit,
                                     batch_size=batch_size)
    render(results, console)
    if json_out is not None:
        write_json(json_out, results)
    return results
