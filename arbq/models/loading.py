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
    """Turn a CLI MODEL into a ModelRef; a local-looking path that does not exist is an error. Local
    paths are made absolute, so run.json and manifests name the same model from any working dir."""
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ArbqError(f"model file not found: {model}")
        return ModelRef(os.path.abspath(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ArbqError(f"{model} is a directory without config.json: not a Hugging Face model dir")
        return ModelRef(os.path.abspath(p))
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


def check_quantization(ref: ModelRef, config) -> None:
    """Refuse a `quantization_config` that transformers has no quantizer for: transformers would warn
    (hidden by TRANSFORMERS_VERBOSITY=error) and load the checkpoint's packed tensors as unexpected keys
    next to randomly initialised weights."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    method = getattr(method, "value", method)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    if method not in AUTO_QUANTIZER_MAPPING:
        raise ArbqError(f"{ref}: unknown quantization_config quant_method {method!r} (arbq reads 'arbq' packed "
                        f"dirs and the methods transformers supports); it would load with random weights")


def _names(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_loading_info(ref: ModelRef, info: dict) -> None:
    """Refuse a checkpoint with missing, unexpected or mismatched weights (transformers only warns and
    fills the gaps with random values; tied weights are not reported missing)."""
    for key, what in (("missing_keys", "is missing"), ("unexpected_keys", "has unexpected"),
                      ("mismatched_keys", "has wrongly shaped")):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(key) or ()]
        if keys:
            raise ArbqError(f"checkpoint {ref} {what} weights: {_names(keys)}")


def load_model(ref: ModelRef, dtype: torch.dtype | str = "auto") -> tuple[nn.Module, ArchSpec]:
    """Load a causal LM on CPU in eval mode, after checking its architecture is supported.
    dtype "auto" keeps the checkpoint's dtype (stages lift one layer at a time to float32)."""
    from transformers import AutoModelForCausalLM

    config = load_config(ref)
    spec = arch_for(config.model_type, config)
    check_quantization(ref, config)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(ref.path, dtype=dtype, output_loading_info=True,
                                                           **ref.kwargs())
    except (OSError, ValueError, KeyError) as e:
        raise _hub_error(ref, e) from None
    check_loading_info(ref, info)
    model.hf_quantizer = None if ref.gguf_file else getattr(model, "hf_quantizer", None)
    model.eval()
    model.config.use_cache = False
    return model, spec


def max_context(config) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config   # multimodal: its LM's
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
