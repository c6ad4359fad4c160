"""Run a causal LM one decoder layer at a time on calibration samples.

`capture_inputs` stops the model at decoder layer 0 and keeps, per sample, the hidden states that
enter it plus the keyword arguments the model passes to every layer (position embeddings, masks).
`forward_layer` then maps those hidden states through any one layer, and `accumulate_hessians`
does the same while summing xᵀx of the inputs of chosen linears (forward hooks).
Only one layer's activations are held at a time: n × [S, D] in, n × [S, D] out, each an
`Activations` store (device, CPU or disk: arbq.models.activations); plain [n, S, D] tensors work too
(outputs then come back as [n, S, D] float32 CPU tensors). Samples go through the layer one at a time.
"""

from __future__ import annotations

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


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, device: str = "cpu",
                   out: Activations | None = None) -> tuple[Activations | torch.Tensor, dict[str, Any]]:
    """Hidden states entering layer 0 for each sample of `samples` [n, S] (float32 into `out`; without
    it a [n, S, D] CPU tensor), and the layer kwargs. Everything before layer 0 must be on `device`."""
    store: dict[str, Any] = {}
    acts = out if out is not None else TensorActivations(samples.shape[0], "cpu")

    def hook(_mod, args, kwargs):
        store["x"] = args[0] if args else kwargs["hidden_states"]
        store.setdefault("kwargs", {k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(samples.shape[0]):
            try:
                model(samples[i: i + 1].to(device), use_cache=False)
            except _Stop:
                pass
            acts.put(i, store.pop("x")[0].float())
    finally:
        handle.remove()
    kwargs = store["kwargs"]
    for key in ("past_key_value", "past_key_values", "use_cache", "output_attentions"):
        kwargs.pop(key, None)
    return (acts if out is not None else acts.data), kwargs


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def forward_layer(layer: nn.Module, x: Activations | torch.Tensor, kwargs: dict[str, Any], device: str = "cpu",
                  name: str = "layer", out: Activations | None = None, keep: bool = True
                  ) -> Activations | torch.Tensor | None:
    """Outputs of `layer` for inputs x (n × [S, D]), one sample at a time, into `out` (a CPU [n, S, D]
    tensor when x is a tensor); with keep=False they are only checked, not stored, and None is returned."""
    plain = isinstance(x, torch.Tensor)
    xs = TensorActivations(0, data=x) if plain else x
    if keep and out is None:
        if not plain:
            raise ValueError("forward_layer: give `out` for an Activations input")
        out = TensorActivations(len(xs), "cpu")
    kw = _to(kwargs, device)
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
