"""Block-wise reconstruction: tune a binarized decoder layer's stored values on the calibration data.

The bits (signs, group bits, salient columns, N:M masks) are kept; the values every result type lists in
`tunable()` — α, μ, column scales, each as v = v₀ + p·σ — are moved by Adam to minimise the layer's output
error on the calibration samples:

    L(p) = (1/n) Σ_s ‖f(X_s; Ŵ(p)) − Y_s‖² / ‖Y_s − X_s‖²   (mean over tokens and features)

with X_s the sample's inputs to this layer (outputs of the already-binarized layers before it), Y_s the
target (the layer's full-precision output on the same X_s) and f the decoder layer with every binarized
linear's weight replaced by Ŵ(p) (torch.func.functional_call; norms, embeddings and the other parameters are
constants). Dividing by ‖Y − X‖² (the layer's own contribution to the residual stream) makes the loss a
relative error that the residual does not dilute.

One Adam step per sample, `epochs` passes in a seeded order, cosine learning-rate decay. The forward pass sees
the values as they will be stored (each module's `store` rounding: fp16, or fp8 with its per-tensor factor),
with the straight-through gradient v + (store(v) − v).detach(). The stored values are kept only if their loss
on all samples is lower than before (so a layer never gets worse on its calibration data). Modules without a
`store` rounding or a `tunable()` result (e.g. gptq) and MoE expert projections are constants.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arbq.errors import ArbqError

Tensor = torch.Tensor


@dataclass(frozen=True)
class TuneSettings:
    """epochs: passes over the samples (0 = off); lr: Adam's step size for p (relative units: 1e-3 moves a
    scale by ≈ 0.1% per step); seed: the sample order's generator seed."""

    epochs: int
    lr: float
    seed: int = 0


def _weight_names(layer: nn.Module, lin: dict[str, nn.Module]) -> dict[str, str]:
    """linear name -> the layer's parameter name of its weight, for the plain nn.Linear ones."""
    path = {id(mod): name for name, mod in layer.named_modules()}
    return {name: f"{path[id(mod)]}.weight" for name, mod in lin.items()
            if isinstance(mod, nn.Linear) and id(mod) in path}


def _relative_error(y: Tensor, target: Tensor, x: Tensor) -> Tensor:
    return ((y - target) ** 2).mean() / ((target - x) ** 2).mean().clamp_min(1e-20)


Store = Callable[[Any], dict[str, Tensor]]


def tune_layer(layer: nn.Module, lin: dict[str, nn.Module], results: dict[str, Any], store: dict[str, Store],
               n: int, sample: Callable[[int], tuple[Tensor, Tensor]], kwargs: dict[str, Any],
               settings: TuneSettings, name: str = "layer") -> tuple[dict[str, Any], dict[str, float]]:
    """Tune `results` (linear name -> result) of `layer` as in the module docstring. store: linear name ->
    (result -> its value tensors as stored, e.g. arbq.packed.layouts.Layout.stored_values). sample(s) -> (X_s [1, S, D],
    Y_s [1, S, D]) on the layer's device and dtype; kwargs: the layer's call arguments. Returns (results, with the
    tuned values where they improved; {"loss_before", "loss_after", "seconds"}: the mean relative error
    over all samples with the stored (rounded) values). The layer's weights are left at the returned results'
    Ŵ."""
    t0 = time.perf_counter()
    wname = _weight_names(layer, lin)
    tuned = {k: r for k, r in results.items() if k in wname and k in store and hasattr(r, "tunable")}
    for p in layer.parameters():
        p.requires_grad_(False)
    base = {k: r.tunable() for k, r in tuned.items()}
    params = {k: {f: torch.zeros_like(v, requires_grad=True) for f, (v, _) in vals.items()} for k, vals in base.items()}

    def values(k: str, rounded: bool) -> dict[str, Tensor]:
        """rounded: the stored values (no gradient); else the straight-through form."""
        out = {f: v + params[k][f] * s for f, (v, s) in base[k].items()}
        kept = store[k](tuned[k].with_values({f: v.detach() for f, v in out.items()}))
        if rounded:
            return {f: kept[f] for f in out}
        return {f: v + (kept[f] - v).detach() for f, v in out.items()}

    def weights(rounded: bool) -> dict[str, Tensor]:
        return {wname[k]: tuned[k].with_values(values(k, rounded)).dequantize().to(lin[k].weight.dtype)
                for k in tuned}

    def loss(s: int, w: dict[str, Tensor]) -> Tensor:
        x, y = sample(s)
        out = torch.func.functional_call(layer, w, (x,), kwargs)
        out = out[0] if isinstance(out, tuple | list) else out
        return _relative_error(out.float(), y.float(), x.float())

    @torch.no_grad()
    def mean_loss(rounded: bool) -> float:
        w = weights(rounded)
        return sum(float(loss(s, w)) for s in range(n)) / n

    before = mean_loss(True)
    flat = [p for d in params.values() for p in d.values()]
    if not flat or settings.epochs <= 0:
        return results, {"loss_before": before, "loss_after": before, "seconds": time.perf_counter() - t0}
    opt = torch.optim.Adam(flat, lr=settings.lr)
    total = settings.epochs * n
    gen = torch.Generator().manual_seed(settings.seed)
    step = 0
    with torch.enable_grad():
        for _ in range(settings.epochs):
            for s in torch.randperm(n, generator=gen).tolist():
                for g in opt.param_groups:
                    g["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                opt.zero_grad(set_to_none=True)
                err = loss(s, weights(False))
                if not torch.isfinite(err):
                    raise ArbqError(f"{name}: reconstruction loss is not finite")
                err.backward()
                opt.step()
                step += 1
    after = mean_loss(True)
    if after < before:
        results = {**results, **{k: r.with_values(values(k, True)) for k, r in tuned.items()}}
    else:
        after = before
    with torch.no_grad():
        for k in tuned:
            lin[k].weight.data.copy_(results[k].dequantize().to(lin[k].weight.dtype))
    return results, {"loss_before": before, "loss_after": after, "seconds": time.perf_counter() - t0}
