"""Dataset loader for the offline `botchan_cloze` lm-eval task (`custom_dataset` in its YAML).

Reads `botchan_cloze.jsonl` next to this file, so the task works from any working directory
without the Hugging Face hub (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).with_name("botchan_cloze.jsonl")


def load(**_metadata):
    """DatasetDict {"test": rows {"id", "context", "choices"[4], "label"}}; lm-eval passes metadata."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
