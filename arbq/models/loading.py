"""Resolve a MODEL argument (local HF dir, hub id, or .gguf file) and load config, tokenizer, model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from arbq.errors import ArbqError
from arbq.models.arch import ArchSpec, arch_for


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: `path` is a local dir or a hub id; `gguf_file` names a GGUF in it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path


def resolve(model: str) -> ModelRef:
    """Turn a CLI MODEL into a ModelRef; a local-looking path that does not exist is an error."""
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ArbqError(f"model file not found: {model}")
        return ModelRef(str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ArbqError(f"{model} is a directory without config.json: not a Hugging Face model dir")
        return ModelRef(str(p))
    looks_local = model.startswith((".", "/", "~")) or os.sep in model and model.count("/") != 1
    if p.exists() or looks_local:
        raise ArbqError(f"model not found: {model}")
    return ModelRef(model)  # a hub id such as meta-llama/Llama-2-7b-hf


def _hub_error(ref: ModelRef, e: Exception) -> ArbqError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ArbqError(f"could not load model {ref}: {first}")


def load_config(ref: ModelRef):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.path, **ref.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _hub_error(ref, e) from None


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref.path, **ref.kwargs())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _hub_error(ref, e) from None


def check_device(device: str) -> torch.device:
    """torch.device for `--device` (cpu, cuda, cuda:N); one-line ArbqError if malformed or unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ArbqError(f"bad --device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ArbqError(f"bad --device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArbqError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ArbqError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model(ref: ModelRef, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, ArchSpec]:
    """Load a causal LM on CPU in eval mode, after checking its architecture is supported.
    dtype "auto" keeps the checkpoint's dtype (stages lift one layer at a time to float32)."""
    from transformers import AutoModelForCausalLM

    spec = arch_for(load_config(ref).model_type)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype, **ref.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _hub_error(ref, e) from None
    model.hf_quantizer = None if ref.gguf_file else getattr(model, "hf_quantizer", None)
    model.eval()
    model.config.use_cache = False
    return model, spec


def max_context(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
