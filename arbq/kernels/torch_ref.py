"""Pure-torch backend: unpack a tile of rows to fp32 and matmul. Correct on every device, slow at batch 1."""

from __future__ import annotations

import torch

from arbq.packed import layouts
from arbq.packed.codec import PackedLinear

NAME = "torch"
LAYOUTS = "*"   # every layout: rows rebuilt by the layout's own dequantize_rows
TILE_ROWS = 512


def supports(p: PackedLinear, x: torch.Tensor) -> bool:
    return True


def matmul(p: PackedLinear, x: torch.Tensor, cache: dict) -> torch.Tensor:
    """y [M, N] fp32 = x [M, K] @ Ŵᵀ, Ŵ rebuilt TILE_ROWS rows at a time by the layout's equation."""
    n = p.spec.out_features
    rows = layouts.layout_of(p.spec.layout).dequantize_rows
    x = x.float()
    y = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, TILE_ROWS):
        r1 = min(r0 + TILE_ROWS, n)
        y[:, r0:r1] = x @ rows(p, r0, r1).T
    return y
