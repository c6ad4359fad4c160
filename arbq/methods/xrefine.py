"""ARB-X: calibration-aware refinement of a block's row parameters, signs fixed.

Objective (per row r of the block, summed): E = Σ_r R_r S R_rᵀ with R = W − Ŵ and S = H[s:e, s:e]
(∝ XᵀX of the block's columns, so E ∝ ‖X_block (W − Ŵ)ᵀ‖²). Every row parameter θ enters Ŵ
linearly along a direction v (μ: the group mask m; α_k: c_k ⊙ b_k ⊙ m), so the exact coordinate
minimiser is θ ← θ + (v S Rᵀ)_r / (v S vᵀ)_r — E never rises. Cross-group coupling through S is
included because R is the residual of the whole block.
"""

from __future__ import annotations

import torch

from arbq.methods.binarizers import Fit


def _step(R: torch.Tensor, v: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Per-row optimal step along direction v: [N, C] → [N]."""
    vS = v @ S
    num = (vS * R).sum(-1)
    den = (vS * v).sum(-1)
    return torch.where(den > 1e-20, num / den.clamp_min(1e-20), torch.zeros_like(num))


def x_refine(W: torch.Tensor, S: torch.Tensor, fits: list[tuple[torch.Tensor, Fit]], iters: int,
             mean_form: bool) -> list[Fit]:
    """Refine μ and α of every group fit against S. W: [N, C]; S: [C, C]; fits: (mask [N, C], Fit)."""
    fits = [(m.to(W.dtype), Fit(f.w_hat.clone(), f.signs, f.alpha.clone(), f.mu.clone(), f.col))
            for m, f in fits]
    R = W - sum(f.w_hat for _, f in fits)
    for _ in range(iters):
        for m, f in fits:
            if mean_form:
                d = _step(R, m, S)
                f.mu += d
                R -= d[:, None] * m
            for k in range(f.signs.shape[0]):
                v = f.col[k][None, :] * f.signs[k] * m
                d = _step(R, v, S)
                f.alpha[k] += d
                R -= d[:, None] * v
    for m, f in fits:
        f.w_hat = (f.mu[:, None] * m if mean_form else 0) + \
            (f.alpha[..., None] * f.col[:, None, :] * f.signs).sum(0) * m
    return [f for _, f in fits]
