"""A causal LM processed one decoder layer at a time, read lazily from its safetensors checkpoint.

`open_layerwise(ref)` returns a `LayerwiseModel`:
- `LazyModel` when MODEL is a plain safetensors checkpoint (a local or hub-cached HF dir with
  `model.safetensors`, or shards listed in `model.safetensors.index.json`): the skeleton is built with
  every parameter on the meta device (buffers such as rotary `inv_freq` are not in checkpoints and are
  computed for real from the config, as transformers does); `load_stem` reads the tensors outside the
  decoder layers (embeddings, norms, positional tables; `lm_head` only when tied to the embeddings,
  where it costs nothing), `load_layer(i)` reads decoder layer i with `safe_open` right before it is
  processed, and `free_stem` / `free_layer` put them back on the meta device. Peak memory ≈ the stem
  + one layer (+ activations).
- the eager base class otherwise (.gguf, .bin, quantized checkpoints, keys it cannot map, `lazy=False`):
  the whole model is loaded on CPU as before and layers are moved to the device and back.
Both give bit-identical tensors: checkpoint → model dtype (as `from_pretrained` casts) → float32 on
the device for a decoder layer. Which file holds which tensor, and the model-key → checkpoint-key map
(fused MoE experts assembled per layer), is arbq.models.checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from arbq import dtypes
from arbq.errors import ArbqError
from arbq.models import arch as archmod
from arbq.models import layerwise
from arbq.models.checkpoint import Fused, checkpoint_files, map_keys, module_name, read_tensors, sources
from arbq.models.loading import ModelRef, load_config, load_model


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device (buffers such as rotary tables stay real)."""
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere). Without it the
    freed tensors of earlier layers stay in the process as fragmented free heap and the RSS creeps up."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _tied(model: nn.Module) -> bool:
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out_emb is not None and out_emb.weight is in_emb.weight


def _own_tensors(mod: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, in a checkpoint?) for `mod`'s own parameters and buffers (not its children's)."""
    for k, p in mod._parameters.items():
        if p is not None:
            yield k, p, True
    for k, b in mod._buffers.items():
        if b is not None:
            yield k, b, k not in mod._non_persistent_buffers_set


def _set(mod: nn.Module, key: str, t: torch.Tensor) -> None:
    old = mod._parameters.get(key)
    if old is not None:
        mod._parameters[key] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[key] = t


def _move(mod: nn.Module, device: str | torch.device) -> None:
    """Move `mod`'s own tensors; parameters in place (`.data`), so tied parameters stay tied."""
    for k, t, _ in list(_own_tensors(mod)):
        if isinstance(t, nn.Parameter):
            t.data = t.data.to(device)
        else:
            mod._buffers[k] = t.to(device)


class LayerwiseModel:
    """A causal LM loaded in full on CPU (the eager path); decoder layers go to the device one at a time."""

    lazy = False

    def __init__(self, model: nn.Module, spec: archmod.ArchSpec):
        self.model, self.spec = model, spec
        self.layers: nn.ModuleList = archmod.decoder_layers(model, spec)
        self.tied = _tied(model)
        out_emb = model.get_output_embeddings()
        skip = [spec.layers, *spec.unused] + ([module_name(model, out_emb)] if out_emb is not None else [])
        # (name, module) of every module but the decoder layers, the output embeddings (tied ones share
        # the input embeddings' weight) and the modules a text forward never runs: what runs before layer 0
        self.stem = [(n, m) for n, m in model.named_modules() if not any(n == s or n.startswith(s + ".")
                                                                          for s in skip)]
        self._dtypes: dict[int, torch.dtype] = {}

    @property
    def config(self):
        return self.model.config

    def __len__(self) -> int:
        return len(self.layers)

    def load_stem(self, device: str | torch.device) -> None:
        """Put the tensors outside the decoder layers (what runs before layer 0) on `device`."""
        for _, mod in self.stem:
            _move(mod, device)

    def free_stem(self) -> None:
        for _, mod in self.stem:
            _move(mod, "cpu")

    def layer0_inputs(self, samples: torch.Tensor, device: str, out) -> tuple:
        """(inputs of decoder layer 0 stored in `out`, its forward kwargs) for token samples [n, seqlen],
        with the stem on `device` only meanwhile (see layerwise.capture_inputs)."""
        self.load_stem(device)
        try:
            return layerwise.capture_inputs(self.model, self.layers, samples, device, out=out)
        finally:
            self.free_stem()

    def load_layer(self, i: int, device: str | torch.device) -> nn.Module:
        """Decoder layer i in float32 on `device`."""
        layer = self.layers[i]
        self._dtypes[i] = next(layer.parameters()).dtype
        return layer.to(device, torch.float32)

    def free_layer(self, i: int) -> None:
        self.layers[i].to("cpu", self._dtypes.pop(i))


class LazyModel(LayerwiseModel):
    """Skeleton on the meta device; tensors are read from the safetensors checkpoint when needed."""

    lazy = True

    def __init__(self, model: nn.Module, spec: archmod.ArchSpec, files: dict[str, Path],
                 keymap: dict[str, str | Fused]):
        super().__init__(model, spec)
        self.files, self.keymap = files, keymap

    def _fill(self, modules: list[tuple[str, nn.Module]], device: str | torch.device) -> None:
        """Read every meta tensor of `modules` ((dotted name, module)) from the checkpoint, cast to the
        model dtype and put on `device`."""
        want = [(f"{name}.{k}" if name else k, mod, k, t) for name, mod in modules
                for k, t, stored in _own_tensors(mod) if stored and t.device.type == "meta"]
        got = read_tensors(self.files, [ck for full, *_ in want for ck in sources(self.keymap[full])])
        for full, mod, k, t in want:
            src = self.keymap[full]
            value = src.assemble(got) if isinstance(src, Fused) else got[src]
            if value.shape != t.shape:
                raise ArbqError(f"{self.keymap[full]}: checkpoint shape {tuple(value.shape)} does not match the "
                                f"model's {tuple(t.shape)} (config.json and weights disagree)")
            _set(mod, k, value.to(t.dtype).to(device))

    def load_stem(self, device: str | torch.device) -> None:
        self._fill(self.stem, device)
        super().load_stem(device)                  # non-persistent buffers (rotary tables)
        if self.tied:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def free_stem(self) -> None:
        for _, mod in self.stem:
            _to_meta(mod)
        if self.tied:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        release_memory()

    def load_layer(self, i: int, device: str | torch.device) -> nn.Module:
        prefix = f"{self.spec.layers}.{i}"
        self._fill([(f"{prefix}.{n}" if n else prefix, m) for n, m in self.layers[i].named_modules()], "cpu")
        return self.layers[i].to(device, torch.float32)

    def free_layer(self, i: int) -> None:
        for mod in self.layers[i].modules():
            _to_meta(mod)
        release_memory()


def _to_meta(mod: nn.Module) -> None:
    """Drop `mod`'s own parameters and persistent buffers to the meta device; others go back to CPU."""
    for k, t, stored in list(_own_tensors(mod)):
        if not stored:
            mod._buffers[k] = t.to("cpu")
        elif t.device.type != "meta":
            _set(mod, k, t.to("meta"))


_DTYPES = {k: dtypes.SAFETENSORS[k] for k in dtypes.FLOAT_WEIGHTS}


def _stored_dtype(files: dict[str, Path]) -> torch.dtype:
    """The dtype of the checkpoint's first floating tensor, from its header (float32 if none)."""
    path = next(iter(files.values()))
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                if f.get_slice(k).get_dtype() in _DTYPES:
                    return _DTYPES[f.get_slice(k).get_dtype()]
    except (SafetensorError, OSError) as e:
        raise ArbqError(f"corrupt or truncated safetensors file {path}: {e}") from None
    return torch.float32


def _skeleton(config, files: dict[str, Path]) -> nn.Module:
    """The model with parameters on the meta device, in the dtype `from_pretrained(dtype="auto")` picks:
    the config's dtype, else the checkpoint's."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        dtype = _stored_dtype(files)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model


def open_layerwise(ref: ModelRef, lazy: bool = True) -> LayerwiseModel:
    """`ref` ready for layer-by-layer processing: lazy when it is a plain safetensors checkpoint."""
    config = load_config(ref)
    spec = archmod.arch_for(config.model_type, config)
    plain = getattr(config, "quantization_config", None) is None
    files = checkpoint_files(ref) if lazy and plain else None
    if files:
        model = _skeleton(config, files)
        keymap = map_keys(model, files)
        if keymap is not None:
            return LazyModel(model, spec, files, keymap)
    model, _ = load_model(ref)
    return LayerwiseModel(model, spec)
