"""Stored column orders: a layout may hold a linear's input columns in runs of m taken in another order than the
model's (GPTQ's act order by whole runs: `run_order` of the binary family, `nm_act_order` of the N:M methods).

    run_order int16 [⌊K/m⌋]   the model's run of every stored run of m columns; a last partial run of K mod m
                              columns stays last. π = order_columns(run_order, m, K): stored column c is the
                              model's column π[c], so Ŵ_model[:, π] = Ŵ_stored and y = x[..., π] @ Ŵ_storedᵀ.

The binary layout's runs are RUN = 8 columns (one byte of every bit plane); an N:M layout's are its m.
Honest bits: 16·⌊K/m⌋ per linear, the "run_order" component.
"""

from __future__ import annotations

from typing import Any

import torch

from arbq.errors import ArbqError

ORDER = "run_order"   # the tensor's suffix, the params flag and the size-report component
RUN = 8               # the binary layout's run length


def order_columns(order: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """π, int64 [K]: the model's column of every stored column for a run order [⌊K/m⌋] (stored run r = the
    model's run order[r]; a last partial run of K mod m columns stays last)."""
    runs = order.long()[:, None] * m + torch.arange(m, device=order.device)[None, :]
    return torch.cat([runs.reshape(-1), torch.arange(k - k % m, k, device=order.device)])


def check_order(order: torch.Tensor, k: int, m: int, name: str) -> None:
    """Raise ArbqError unless order is an integer tensor [⌊K/m⌋] holding every run index once."""
    runs = k // m
    if order.dtype.is_floating_point or order.dtype == torch.bool or tuple(order.shape) != (runs,) or \
            not torch.equal(torch.sort(order.long()).values, torch.arange(runs, device=order.device)):
        raise ArbqError(f"{name}: {ORDER} is not a permutation of the {runs} runs of {m} columns "
                        f"(got {order.dtype} {tuple(order.shape)})")


def in_model_order(w: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """w [R, K] with its columns in stored order -> the model's order, out[:, π] = w (w itself when π is None)."""
    if cols is None:
        return w
    out = torch.empty_like(w)
    out[:, cols.to(w.device)] = w
    return out


def order_shape(spec: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{run_order: int16 [⌊K/m⌋]} for a spec that stores a run order (`ordered`, runs of `run_length`), else {}."""
    if not spec.ordered:
        return {}
    return {ORDER: ((spec.in_features // spec.run_length,), torch.int16)}


def order_bits(spec: Any) -> dict[str, int]:
    """{run_order: 16·⌊K/m⌋ bits} for a spec that stores a run order, else {}."""
    return {ORDER: 16 * shape[0][0]} if (shape := order_shape(spec).get(ORDER)) else {}


def stored_order(p: Any) -> torch.Tensor | None:
    """The run order of a packed linear (arbq.packed.codec.PackedLinear), None when its layout stores none."""
    return p[ORDER] if getattr(p.spec, "ordered", False) else None


def input_columns(p: Any) -> torch.Tensor | None:
    """π, int64 [K], of a packed linear whose layout stores its columns in another order than the model's: every
    kernel computes y = x[..., π] @ Ŵ_storedᵀ; None for the others."""
    order = stored_order(p)
    return None if order is None else order_columns(order, p.spec.run_length, p.spec.in_features)
