"""Calibration and evaluation text: named datasets (through `datasets`) or local files.

Named sets follow the GPTQ / BiLLM / ARB-LLM papers: wikitext2 (wikitext-2-raw-v1), ptb
(ptb_text_only) and c4 (allenai/c4, first train/validation shard). A local `.txt` is read whole; a
`.jsonl` contributes the "text" field of each line, joined by blank lines.

A local file may carry a fractional character range, `PATH@A:B` (0 ≤ A < B ≤ 1), e.g.
`botchan.txt@0:0.8` for calibration and `botchan.txt@0.8:1` for held-out evaluation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from arbq.errors import ArbqError

NAMED = ("wikitext2", "c4", "ptb")


def _split_range(spec: str) -> tuple[str, float, float]:
    if "@" in spec:
        path, rng = spec.rsplit("@", 1)
        try:
            a, b = (float(x) for x in rng.split(":"))
        except ValueError:
            raise ArbqError(f"bad text range {rng!r} in {spec!r}: expected A:B with 0 <= A < B <= 1") from None
        if not 0 <= a < b <= 1:
            raise ArbqError(f"bad text range {rng!r} in {spec!r}: expected A:B with 0 <= A < B <= 1")
        return path, a, b
    return spec, 0.0, 1.0


def _named_text(name: str, split: str) -> str:
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
            return ("\n\n" if split != "train" else " ").join(ds["text"])
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank",
                              split="train" if split == "train" else "validation")
            return " ".join(ds["sentence"])
        files = ("en/c4-train.00000-of-01024.json.gz" if split == "train"
                 else "en/c4-validation.00000-of-00008.json.gz")
        ds = load_dataset("allenai/c4", data_files={split: files}, split=split)
        texts = ds["text"] if split == "train" else ds[:1100]["text"]
        return ("\n\n" if split == "train" else " ").join(texts)
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArbqError(f"could not load dataset {name!r} (needs the Hugging Face hub or its cache): {msg}") \
            from None


def load_text(spec: str, split: str = "train") -> str:
    """The raw text of a named dataset split or a local file (optionally a `@A:B` slice of it)."""
    if spec in NAMED:
        return _named_text(spec, split)
    path_s, a, b = _split_range(spec)
    path = Path(path_s).expanduser()
    if not path.is_file():
        raise ArbqError(f"unknown dataset or missing file: {spec!r} (named sets: {', '.join(NAMED)})")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArbqError(f"cannot read text file {path}: {e}") from None
    if path.suffix == ".jsonl":
        try:
            raw = "\n\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArbqError(f"{path}: every line must be a JSON object with a 'text' field ({e})") from None
    text = raw[int(a * len(raw)): int(b * len(raw))]
    if not text.strip():
        raise ArbqError(f"text file {spec} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [T] (int64) of the whole text, as the papers do: one long stream."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids.to(torch.int64)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] random windows, GPTQ-style: random.seed(seed); i = randint(0, T - seqlen - 1)."""
    total = ids.numel()
    if seqlen + 1 > total:
        raise ArbqError(f"--seqlen {seqlen} is longer than the calibration text ({total} tokens)")
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[i: i + seqlen] for i in starts])
