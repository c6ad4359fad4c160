"""Kernel backends for BinaryLinear, chosen by name with a fallback to the pure-torch one.

A backend is a module with NAME, LAYOUTS (the packed layouts it runs, arbq.packed.layouts; ALL for the
torch backend), `supports(p, x) -> bool` (asked only for a layout in LAYOUTS) and
`matmul(p, x, cache) -> y`, where p is an arbq.packed.codec.PackedLinear, x: [M, K] float and
y: [M, N] = x @ Ŵᵀ, float32 (bf16 from the CPU backend's bf16 prefill path). The torch backend runs every
layout, so it is the fallback for all.
`cache` is a dict owned by the calling module, for derived tensors a backend prepares once.
Optionally `bind(p, x, cache, bias, watch, env) -> call | None`: the layer's product for inputs like x bound
once (BinaryLinear's fast path at batch 1); call(x) returns y [..., N] in x's dtype with the bias added, or None
when a tensor in `watch` changed in place, an environment variable in `env` (or one the backend reads) changed,
or x does not fit the binding.
Optionally `resident_form(p, where) -> PackedLinear`: p in the layout the backend reads in place (the same Ŵ),
which a loaded model holds instead of the stored one (arbq.packed.loader.adopt_resident_forms).
Choose with the ARBQ_KERNEL environment variable (auto | cpu | triton | torch) or BinaryLinear.backend.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from arbq.errors import ArbqError

BACKENDS: dict[str, str] = {"cpu": "arbq.kernels.cpu", "triton": "arbq.kernels.triton_gpu",
                            "torch": "arbq.kernels.torch_ref"}
AUTO_ORDER = ("cpu", "triton", "torch")
ALL = "*"


def backend(name: str) -> ModuleType:
    try:
        return importlib.import_module(BACKENDS[name])
    except KeyError:
        raise ArbqError(f"unknown kernel backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}") from None


ENV = "ARBQ_KERNEL"


def default_name() -> str:
    return os.environ.get(ENV, "auto")


def runs_layout(mod: ModuleType, layout: str) -> bool:
    return mod.LAYOUTS == ALL or layout in mod.LAYOUTS


def backends_for(layout: str) -> list[str]:
    """Names of the backends that run `layout` (the torch backend runs all of them)."""
    return [n for n in BACKENDS if runs_layout(backend(n), layout)]


def pick(p, x: torch.Tensor, name: str | None = None) -> ModuleType:
    """The backend named (or ARBQ_KERNEL, or the first of AUTO_ORDER) that runs p's layout and supports
    (p, x); else torch."""
    name = name or default_name()
    for cand in (AUTO_ORDER if name == "auto" else (name,)):
        mod = backend(cand)
        if runs_layout(mod, p.spec.layout) and mod.supports(p, x):
            return mod
    return backend("torch")


def matmul(p, x: torch.Tensor, cache: dict, name: str | None = None) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] @ Ŵᵀ with the chosen backend."""
    return pick(p, x, name).matmul(p, x, cache)


def resident_form(p, device: torch.device | str, where: str = "linear"):
    """p in the layout that the backend running it on `device` reads in place (its `resident_form`), else p."""
    mod = pick(p, torch.empty(0, p.spec.in_features, device=device))
    fn = getattr(mod, "resident_form", None)
    return p if fn is None else fn(p, where)
