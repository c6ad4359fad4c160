"""MethodRecord: everything about one `--method`, found through one record (arbq.methods.registry).

A record names its fit (W, H, cfg, name) -> (result, report row), the packed layout its results are
written in (a key of arbq.packed.layouts.LAYOUTS, whose kernels are registered per layout in
arbq.kernels) and the layout params it derives from the recipe, and the result type stored in
RUN/layers (`from_tensors`, `to_tensors`, `dequantize`, `to`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Fit = Callable[[torch.Tensor, "torch.Tensor | None", Any, str], tuple[Any, dict]]


@dataclass(frozen=True)
class MethodRecord:
    """name: the `--method` value; summary: one line for --help and the README; fit: (W [N, K], H [K, K] or
    None, cfg, name) -> (result, report row); layout: packed layout name; layout_params: cfg -> the params
    `Layout.pack` needs; result_type: the class of `fit`'s result; uses_hessian: needs calibration
    statistics; keys: the recipe keys it reads (a per-module override may set only these, plus method);
    check: extra recipe validation (raises ArbqError); label: cfg -> how reports name the method of a module
    (default: the name, plus "+cgb" when the layout params use CGB); layer_plan: (cfg, influence) -> per
    decoder layer the recipe keys to set for that layer's modules, or None (influence() reads the layers'
    calibration scores, only when asked: arbq.methods.cfs); plan_keys: the recipe keys only layer_plan
    reads (model-wide, so no per-module override may set them)."""

    name: str
    summary: str
    fit: Fit
    layout: str
    layout_params: Callable[[Any], dict]
    result_type: type
    uses_hessian: bool = True
    keys: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    label: Callable[[Any], str] | None = None
    layer_plan: Callable[[Any, Callable[[], list[float]]], list[dict] | None] | None = None
    plan_keys: tuple[str, ...] = ()

    @property
    def reads(self) -> frozenset[str]:
        """Every recipe key this method reads: its per-module keys and its layer plan's."""
        return frozenset(self.keys) | frozenset(self.plan_keys)
