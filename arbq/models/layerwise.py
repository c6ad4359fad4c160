"""Run a causal LM one decoder layer at a time on calibration samples.

`capture_inputs` stops the model at decoder layer 0 and keeps, per sample, the hidden states that
enter it plus the keyword arguments the model passes to every layer (position embeddings, masks).
`forward_layer` then maps those hidden states through any one layer, and `accumulate_hessians`
does the same while summing xᵀx of the inputs of chosen linears (forward hooks).
Only one layer's activations are held at a time: [n, S, D] in, [n, S, D] out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from arbq.errors import ArbqError


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, device: str = "cpu"
                   ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering layer 0 for each sample: ([n, S, D] float32 on CPU, layer kwargs)."""
    store: dict[str, Any] = {}

    def hook(_mod, args, kwargs):
        store["x"] = args[0] if args else kwargs["hidden_states"]
        store.setdefault("kwargs", {k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    outs = []
    try:
        for i in range(samples.shape[0]):
            try:
                model(samples[i: i + 1].to(device), use_cache=False)
            except _Stop:
                pass
            outs.append(store.pop("x").float().cpu())
    finally:
        handle.remove()
    kwargs = store["kwargs"]
    for key in ("past_key_value", "past_key_values", "use_cache", "output_attentions"):
        kwargs.pop(key, None)
    return torch.cat(outs), kwargs


def _to(obj: Any, device: str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def forward_layer(layer: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], device: str = "cpu",
                  name: str = "layer") -> torch.Tensor:
    """Outputs [n, S, D] (float32, CPU) of `layer` for inputs x: [n, S, D], one sample at a time."""
    kw = _to(kwargs, device)
    dtype = next(layer.parameters()).dtype
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        y = layer(x[i: i + 1].to(device, dtype), **kw)
        y = y[0] if isinstance(y, tuple | list) else y
        out[i] = y[0].float().cpu()
    if not torch.isfinite(out).all():
        raise ArbqError(f"{name}: non-finite activations (NaN/Inf) in the layer output")
    return out


@torch.no_grad()
def accumulate_hessians(layer: nn.Module, linears: dict[str, nn.Linear], x: torch.Tensor,
                        kwargs: dict[str, Any], device: str = "cpu", dtype: torch.dtype = torch.float32,
                        name: str = "layer") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """H = (2/n) Σ xᵀx over all n calibration tokens of each named linear's input, and the layer
    output. Returns ({name: H [K, K] on CPU}, outputs [n, S, D])."""
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
        out = forward_layer(layer, x, kwargs, device, name)
    finally:
        for h in handles:
            h.remove()
    n = max(count["n"], 1)
    hess = {k: (2.0 / n * s).float().cpu() for k, s in sums.items()}
    for k, h in hess.items():
        if not torch.isfinite(h).all():
            raise ArbqError(f"{name}.{k}: Hessian has NaN/Inf")
    return hess, out
