"""Which checkpoint file holds which tensor: a plain safetensors checkpoint's files (single or sharded) and
the map from a model's state keys to checkpoint keys (as stored, without the base-model prefix, or through
transformers' own renamings; fused MoE experts as `Fused`). Used by the layer-wise loader (arbq.models.lazy)
and the streamed model-fake writer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from arbq.errors import ArbqError
from arbq.models.loading import ModelRef

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_dir(ref: ModelRef) -> Path | None:
    """The local directory holding `ref`'s safetensors (a hub id only if it is in the HF cache already)."""
    if ref.gguf_file:
        return None
    p = Path(ref.path).expanduser()
    if p.is_dir():
        return p
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in (INDEX, SINGLE):
        hit = try_to_load_from_cache(ref.path, name)
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def checkpoint_files(ref: ModelRef) -> dict[str, Path] | None:
    """Checkpoint tensor key → its safetensors file; None when `ref` is not a plain safetensors checkpoint."""
    root = checkpoint_dir(ref)
    if root is None:
        return None
    if (root / INDEX).is_file():
        try:
            weight_map = json.loads((root / INDEX).read_text())["weight_map"]
            files = {k: root / v for k, v in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ArbqError(f"corrupt {root / INDEX}: {e}") from None
        return files if all(f.is_file() for f in set(files.values())) else None
    if not (root / SINGLE).is_file():
        return None
    try:
        with safe_open(str(root / SINGLE), framework="pt") as f:
            return dict.fromkeys(f.keys(), root / SINGLE)
    except (SafetensorError, OSError) as e:
        raise ArbqError(f"corrupt or truncated safetensors file {root / SINGLE}: {e}") from None


def read_tensors(files: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """{key: CPU tensor as stored} for checkpoint `keys`, each file opened once (no unpickling)."""
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for path, ks in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise ArbqError(f"corrupt or truncated safetensors file {path}: {e}") from None
    return out


@dataclass(frozen=True)
class Fused:
    """A model tensor that transformers builds from several checkpoint tensors (fused MoE experts):
    expert e's rows are `keys[e]` concatenated along dim 0, stacked over experts → [E, Σ rows, in]
    (e.g. `experts.gate_up_proj[e] = [gate_proj_e; up_proj_e]`, `experts.down_proj[e] = down_proj_e`)."""

    keys: tuple[tuple[str, ...], ...]

    def assemble(self, got: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat([got[k] for k in row]) for row in self.keys])

    def __str__(self) -> str:
        return f"{self.keys[0][0]} … ({len(self.keys)} experts fused)"


def sources(value: str | Fused) -> list[str]:
    return [k for row in value.keys for k in row] if isinstance(value, Fused) else [value]


def map_keys(model: nn.Module, files: dict[str, Path]) -> dict[str, str | Fused] | None:
    """Model state key → checkpoint key (as is, or without the base-model prefix, e.g. OPT's `model.`,
    or through transformers' own key renamings, e.g. a multimodal Gemma 3's `language_model.model.…` →
    `model.language_model.…`); None if a tensor the layer-wise stages need (anything but the output
    embeddings) is not in the checkpoint."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    out_emb = model.get_output_embeddings()
    head = module_name(model, out_emb) + "." if out_emb is not None else None
    renamed = None
    out = {}
    for key in model.state_dict(keep_vars=True):
        if key in files:
            out[key] = key
        elif key.startswith(prefix) and key[len(prefix):] in files:
            out[key] = key[len(prefix):]
        else:
            renamed = _renamed_keys(model, files) if renamed is None else renamed
            if key in renamed:
                out[key] = renamed[key]
            elif head is None or not key.startswith(head):
                return None
    return out


def _renamed_keys(model: nn.Module, files: dict[str, Path]) -> dict[str, str | Fused]:
    """Model key → checkpoint key(s) by the renamings and expert-merging converters `from_pretrained`
    applies (empty when this transformers has none, or a converter does something else: not lazily loadable)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightRenaming, rename_source_key
    except ImportError:
        return {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    state = model.state_dict(keep_vars=True)
    out: dict[str, str | Fused] = {}
    parts: dict[str, dict[tuple[int, int], str]] = {}      # model key → {(expert, source pattern #): ck}
    sources: dict[str, int] = {}                            # model key → number of source patterns
    for ck in files:
        key, pattern = rename_source_key(ck, renamings, converters, getattr(model, "base_model_prefix", None), state)
        if pattern is None:
            out[key] = ck
            continue
        conv = by_pattern.get(pattern)
        ops = [(type(op), getattr(op, "dim", None)) for op in getattr(conv, "operations", [None])]
        hit = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), ck)
        if ops not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]) or hit is None:
            return {}
        parts.setdefault(key, {})[int(hit.group(1)), conv.source_patterns.index(pattern)] = ck
        sources[key] = len(conv.source_patterns)
    for key, got in parts.items():
        n_exp = max(e for e, _ in got) + 1
        if len(got) != n_exp * sources[key]:
            return {}
        out[key] = Fused(tuple(tuple(got[e, j] for j in range(sources[key])) for e in range(n_exp)))
    return out


def module_name(root: nn.Module, mod: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is mod)
