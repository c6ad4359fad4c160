"""Kernel backends for BinaryLinear, chosen by name with a fallback to the pure-torch one.

A backend is a module with NAME, `supports(p, x) -> bool` and `matmul(p, x, cache) -> y`, where
p is an arbq.packed.codec.PackedLinear, x: [M, K] float and y: [M, N] float32 = x @ Ŵᵀ.
`cache` is a dict owned by the calling module, for derived tensors a backend prepares once.
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


def backend(name: str) -> ModuleType:
    try:
        return importlib.import_module(BACKENDS[name])
    except KeyError:
        raise ArbqError(f"unknown kernel backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}") from None


def default_name() -> str:
    return os.environ.get("ARBQ_KERNEL", "auto")


def pick(p, x: torch.Tensor, name: str | None = None) -> ModuleType:
    """The backend named (or ARBQ_KERNEL, or the first of AUTO_ORDER) that supports (p, x); else torch."""
    name = name or default_name()
    for cand in (AUTO_ORDER if name == "auto" else (name,)):
        mod = backend(cand)
        if mod.supports(p, x):
            return mod
    return backend("torch")


def matmul(p, x: torch.Tensor, cache: dict, name: str | None = None) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] @ Ŵᵀ with the chosen backend."""
    return pick(p, x, name).matmul(p, x, cache)
