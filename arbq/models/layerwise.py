"""Run a causal LM one decoder layer at a time on calibration samples.

`capture_inputs` runs the model with every decoder layer replaced by a recorder (hidden states pass
through unchanged, the last one stops the forward) and keeps, per sample, the hidden states that
enter layer 0 plus the keyword arguments the model passes to each layer (position embeddings, masks):
a `LayerKwargs`, since they may differ per layer (Gemma 2/3 sliding-window vs full-attention layers
get different masks, Gemma 3 also different rotary tables). `forward_layer` then maps those hidden
states through any one layer with that layer's kwargs, and `accumulate_hessians` does the same while
summing xᵀx of the inputs of chosen linears (forward hooks); `block_influence` scores a layer by how much
it changes its hidden states (the coarse stage of N:M methods, arbq.methods.cfs).
Only one layer's activations are held at a time: n × [S, D] in, n × [S, D] out, each an
`Activations` store (device, CPU or disk: arbq.models.activations); plain [n, S, D] tensors work too
(outputs then come back as [n, S, D] float32 CPU tensors). Samples go through the layer one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from arbq.errors import ArbqError
from arbq.models.activations import Activations, TensorActivations

HESSIAN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _Stop(Exception):
    pass


def hessian_dtype(name: str) -> torch.dtype:
    """torch dtype for `--hessian-dtype name` (float32 | float64)."""
    try:
        return HESSIAN_DTYPES[name]
    except KeyError:
        raise ArbqError(f"unknown --hessian-dtype {name!r}; choose one of: {', '.join(HESSIAN_DTYPES)}") from None


class LayerKwargs(dict):
    """The keyword arguments the model passes to its decoder layers. As a dict: layer 0's;
    `for_layer(layer)`: the given layer's (one dict object per distinct set, tensors shared)."""

    def __init__(self, layers: nn.ModuleList, per_layer: list[dict[str, Any]]):
        super().__init__(per_layer[0])
        self.layers, self.per_layer = layers, per_layer

    def for_layer(self, layer: nn.Module) -> dict[str, Any]:
        for mod, kw in zip(self.layers, self.per_layer, strict=True):
            if mod is layer:
                return kw
        raise ValueError(f"{type(layer).__name__} is not one of the decoder layers these kwargs were captured for")


class _Recorder(nn.Module):
    """Stands in for decoder layer i while inputs are captured: records its kwargs, passes the hidden
    states through (nothing is computed), and the last one stops the forward."""

    def __init__(self, i: int, last: bool, store: dict[str, Any]):
        super().__init__()
        self.i, self.last, self.store = i, last, store

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if self.i == 0:
            self.store["x"] = x
        kw = self.store.setdefault("kwargs", {})
        kw.setdefault(self.i, {k: v for k, v in kwargs.items() if k != "hidden_states"})
        if self.last:
            raise _Stop
        return x


_DROP = ("past_key_value", "past_key_values", "cache", "use_cache", "output_attentions")


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Same keys and the very same values (identity: the model hands every layer its shared tensors)."""
    plain = (int, float, str, bool, type(None))
    return a.keys() == b.keys() and all(a[k] is b[k] or (isinstance(a[k], plain) and isinstance(b[k], plain)
                                                         and a[k] == b[k]) for k in a)


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, device: str = "cpu",
                   out: Activations | None = None) -> tuple[Activations | torch.Tensor, LayerKwargs]:
    """Hidden states entering layer 0 for each sample of `samples` [n, S] (float32 into `out`; without
    it a [n, S, D] CPU tensor), and every layer's kwargs (`LayerKwargs`, taken from the first sample:
    all samples have the same length). Everything before layer 0 must be on `device`; the decoder
    layers themselves are not run (they may still be on the meta device)."""
    store: dict[str, Any] = {}
    acts = out if out is not None else TensorActivations(samples.shape[0], "cpu")
    originals = list(layers)
    for i in range(len(originals)):
        layers[i] = _Recorder(i, i == len(originals) - 1, store)
    try:
        for i in range(samples.shape[0]):
            try:
                model(samples[i: i + 1].to(device), use_cache=False)
            except _Stop:
                pass
            acts.put(i, store.pop("x")[0].float())
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    recorded = store["kwargs"]
    if len(recorded) != len(originals):
        raise ArbqError(f"the model called {len(recorded)} of its {len(originals)} decoder layers")
    distinct: list[dict[str, Any]] = []
    per_layer = []
    for i in range(len(originals)):
        kw = {k: v for k, v in recorded[i].items() if k not in _DROP}
        match = next((d for d in distinct if _same(d, kw)), None)
        if match is None:
            distinct.append(match := kw)
        per_layer.append(match)
    return (acts if out is not None else acts.data), LayerKwargs(layers, per_layer)


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def call_kwargs(layer: nn.Module, kwargs: dict[str, Any], device: str) -> dict[str, Any]:
    """The keyword arguments `layer` is called with (a LayerKwargs' entry for it, or the one dict), on device."""
    return _to(kwargs.for_layer(layer) if isinstance(kwargs, LayerKwargs) else kwargs, device)


@torch.no_grad()
def forward_layer(layer: nn.Module, x: Activations | torch.Tensor, kwargs: dict[str, Any], device: str = "cpu",
                  name: str = "layer", out: Activations | None = None, keep: bool = True
                  ) -> Activations | torch.Tensor | None:
    """Outputs of `layer` for inputs x (n × [S, D]), one sample at a time, into `out` (a CPU [n, S, D]
    tensor when x is a tensor); with keep=False they are only checked, not stored, and None is returned.
    `kwargs`: a LayerKwargs from capture_inputs (this layer's are used) or one dict for any layer."""
    plain = isinstance(x, torch.Tensor)
    xs = TensorActivations(0, data=x) if plain else x
    if keep and out is None:
        if not plain:
            raise ValueError("forward_layer: give `out` for an Activations input")
        out = TensorActivations(len(xs), "cpu")
    kw = call_kwargs(layer, kwargs, device)
    dtype = next(layer.parameters()).dtype
    for i in range(len(xs)):
        y = layer(xs.get(i)[None].to(device, dtype), **kw)
        y = (y[0] if isinstance(y, tuple | list) else y)[0].float()
        if not torch.isfinite(y).all():
            raise ArbqError(f"{name}: non-finite activations (NaN/Inf) in the layer output")
        if keep:
            out.put(i, y)
    if not keep:
        return None
    return out.data if plain else out


@torch.no_grad()
def accumulate_hessians(layer: nn.Module, linears: dict[str, nn.Linear], x: Activations | torch.Tensor,
                        kwargs: dict[str, Any], device: str = "cpu", dtype: torch.dtype = torch.float32,
                        name: str = "layer", out: Activations | None = None, keep: bool = True
                        ) -> tuple[dict[str, torch.Tensor], Activations | torch.Tensor | None]:
    """H = (2/n) Σ xᵀx over all n calibration tokens of each named linear's input, summed in `dtype` on
    `device`, and the layer outputs (see forward_layer). Returns ({name: H [K, K] float32 CPU}, outputs)."""
    sums = {k: torch.zeros(m.in_features, m.in_features, dtype=dtype, device=device) for k, m in linears.items()}
    count = {"n": 0}

    def make_hook(key: str):
        def hook(_mod, args):
            a = args[0].reshape(-1, args[0].shape[-1]).to(dtype)
            sums[key].addmm_(a.T, a)
            if key == first:
                count["n"] += a.shape[0]
        return hook

    first = next(iter(linears))
    handles = [m.register_forward_pre_hook(make_hook(k)) for k, m in linears.items()]
    try:
        y = forward_layer(layer, x, kwargs, device, name, out=out, keep=keep)
    finally:
        for h in handles:
            h.remove()
    n = max(count["n"], 1)
    hess = {k: (2.0 / n * s).float().cpu() for k, s in sums.items()}
    for k, h in hess.items():
        if not torch.isfinite(h).all():
            raise ArbqError(f"{name}.{k}: Hessian has NaN/Inf")
    return hess, y


@contextmanager
def block_influence(layer: nn.Module) -> Iterator[Callable[[], float]]:
    """While open, observe every forward of `layer` (hidden states h [.., S, D] in, f(h) out); the yielded
    getter returns its block influence (ShortGPT) over all tokens t seen so far:

        BI = 1 − mean_t cos(h_t, f(h)_t)        (0: the layer leaves its input unchanged)
    """
    acc = {"cos": 0.0, "n": 0}

    def hook(_mod, args, output):
        h = args[0] if args else None
        y = output[0] if isinstance(output, tuple | list) else output
        if not isinstance(h, torch.Tensor) or h.shape != y.shape:
            return
        cos = torch.nn.functional.cosine_similarity(h.double().reshape(-1, h.shape[-1]),
                                                    y.double().reshape(-1, y.shape[-1]), dim=-1)
        acc["cos"] += float(cos.sum())
        acc["n"] += cos.numel()

    handle = layer.register_forward_hook(hook)
    try:
        yield lambda: 1.0 - acc["cos"] / acc["n"] if acc["n"] else float("nan")
    finally:
        handle.remove()
