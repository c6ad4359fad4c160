"""Perplexity (GPTQ protocol) and zero-shot accuracy of one model, cached per model in a JSON file.

Perplexity rows come from `arbq.stages.evaluate.eval_perplexity` (text, protocol, seqlen, windows,
tokens, ppl); task rows from `arbq.stages.zeroshot.run_tasks` (lm-eval, acc and acc_norm). A cache
entry is keyed by what was asked (text, seqlen, max windows / task, limit, device) and dropped when
the model's config.json is newer than the cache, so a resumed bench evaluates only what is missing.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from arbq.fileio import read_json, write_json

console = Console(stderr=True)


def _stamp(model: Path) -> int:
    return (Path(model) / "config.json").stat().st_mtime_ns


class Evaluator:
    """Evaluates one model lazily (loaded on the first missing figure) with a JSON cache."""

    def __init__(self, model: Path, cache: Path, device: str):
        self.model, self.cache, self.device = Path(model), Path(cache), device
        data = read_json(cache) if cache.is_file() else {}
        self.rows = data.get("rows", {}) if data.get("stamp") == _stamp(model) else {}
        self._net = None

    def _load(self):
        if self._net is None:
            from arbq.stages.evaluate import load_for_eval

            console.print(f"bench: evaluating {self.model}")
            self._net = load_for_eval(str(self.model), self.device)
        return self._net

    def _save(self) -> None:
        write_json(self.cache, {"model": str(self.model), "stamp": _stamp(self.model), "rows": self.rows})

    def perplexity(self, text: str, seqlen: int, max_windows: int | None) -> dict:
        """The eval_perplexity row for `text` (a PATH[@A:B] spec)."""
        key = f"ppl|{text}|{seqlen}|{max_windows}|{self.device}"
        if key not in self.rows:
            from arbq.stages.evaluate import eval_perplexity

            net, tok = self._load()
            self.rows[key] = eval_perplexity(net, tok, text, seqlen, max_windows, console)
            self._save()
        return self.rows[key]

    def task(self, task_yaml: Path, limit: int | None) -> list[dict]:
        """lm-eval rows (acc, acc_norm) of one task YAML, zero-shot, `limit` examples."""
        key = f"task|{task_yaml}|{limit}|{self.device}"
        if key not in self.rows:
            from arbq.stages.zeroshot import run_tasks

            net, tok = self._load()
            console.print(f"bench: lm-eval {Path(task_yaml).stem} (limit {limit}) on {self.model}")
            self.rows[key] = run_tasks(net, tok, [str(task_yaml)], limit=limit)
            self._save()
        return self.rows[key]

    def close(self) -> None:
        self._net = None


def ppl_fields(prefix: str, row: dict, label: str) -> dict:
    """Flat, self-describing fields: PREFIX_ppl plus its text, protocol, seqlen, windows (of all), tokens."""
    return {f"{prefix}_ppl": row["ppl"], f"{prefix}_text": label, f"{prefix}_protocol": row["protocol"],
            f"{prefix}_seqlen": row["seqlen"], f"{prefix}_windows": row["windows"],
            f"{prefix}_windows_total": row["text_tokens"] // row["seqlen"], f"{prefix}_tokens": row["tokens"],
            f"{prefix}_eval_s": row.get("seconds")}


def task_fields(name: str, rows: list[dict]) -> dict:
    """NAME_acc, NAME_acc_stderr, NAME_acc_norm, ..., NAME_n from lm-eval rows."""
    out: dict = {}
    for r in rows:
        out[f"{name}_{r['metric']}"] = r["value"]
        out[f"{name}_{r['metric']}_stderr"] = r["stderr"]
        out[f"{name}_n"] = r["n"]
    return out
