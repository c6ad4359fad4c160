"""Polish a fitted block against its exact loss (recipe key `polish: R`): GPTQ's column recursion for the codes,
then least squares for the row scales, R alternating rounds.

A block's fit (arbq.methods.block) chooses every code as the level nearest to its own weight, and the row scales
α, μ by ARB's refinements on ‖W_b − Ŵ‖². What the loop leaves behind for the block, once the later columns are
compensated, is the exact loss (gptq.block_errors, "exact")

    L(Ŵ) = ‖(W_b − Ŵ) · U_b⁻¹‖²       (U_b: the block's part of the upper Cholesky factor of H⁻¹)

summed over rows. One round lowers it in two steps, each kept only if L went down:

1. Codes (`sequential_codes`): for j = 0 … C − 1, the nearest level of the updated weight w'_j under the block's
   fixed scales (its group re-chosen where the method's regroup may move it), then
       err_j = (w'_j − q_j) / U_jj,   W'[:, j+1:] −= err_j · U[j, j+1:]
   (GPTQ's recursion: the codes of a column make up for the rounding of the columns before it inside the block,
   not only in the later blocks). With `RunPositions` (pbs2p), the N:M positions of every run of M columns are
   re-chosen on W' when the pass reaches the run: the N entries of highest gain (w² − (w − q)²)·c_j stay.
2. Scales (`refit_scales`): with the codes fixed, Ŵ_i = Φ_i θ_i is linear in row i's 12 values θ_i (μ, α₁, α₂ of
   each kind and group; column scales stay), so θ_i = argmin ‖(w_i − Φ_i θ_i) U_b⁻¹‖², a weighted least squares per
   row. RC (no means in its layout) keeps μ = 0; values no entry uses stay as they were.

Fixture model (SmolLM2-135M), 14 linears of layers 5 and 20, geometric-mean output error with `polish: 3`: on the
calibration Hessians rc-cgb 0.02306 → 0.01975, pbs2p 6:8 0.01844 → 0.01602; on Hessians of the held-out text only
0.03221 → 0.02956 (the polished fit follows the 16 × 512 calibration closely), and 0.02807 with percdamp 0.1, the
damping the recipes pair it with (README, "Polishing each block").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from arbq.methods.block import BlockFit, group_levels, nearest_level, round_scales

Tensor = torch.Tensor


@dataclass(frozen=True)
class RunPositions:
    """pbs2p's N:M positions, re-chosen inside the pass: runs of m columns (from the block's first), the
    column weights c [C] of its pruning score, and choose(gain [N, m]) → keep [N, m] (the N highest)."""

    m: int
    weight: Tensor
    choose: Callable[[Tensor], Tensor]


def exact_loss(Wb: Tensor, Q: Tensor, Ub: Tensor) -> float:
    """L = ‖(W_b − Q) · U_b⁻¹‖² for W_b, Q: [N, C], U_b: [C, C] upper triangular."""
    E = torch.linalg.solve_triangular(Ub, Wb - Q, upper=True, left=False)
    return float((E * E).sum())


def movable_columns(salient: Tensor, method_regroups: bool, cgb: bool) -> Tensor:
    """[C] bool: the columns whose group bits a re-fit may move, as `block.regroup` does (methods with a magnitude
    split; salient columns only with CGB)."""
    return (~salient | cgb) & method_regroups


def _pick(q: Tensor, current: Tensor, movable: Tensor, w: Tensor) -> Tensor:
    """Group bit per entry: the nearer group's where movable, else the current one. q: [2, ...]."""
    return torch.where(movable, (w - q[1]).abs() < (w - q[0]).abs(), current)


def sequential_codes(Wb: Tensor, fit: BlockFit, Ub: Tensor, movable: Tensor, keep: Tensor | None = None,
                     runs: RunPositions | None = None) -> tuple[BlockFit, Tensor | None]:
    """Step 1 of the module docstring. Wb: [N, C]; movable: [C] bool, the columns whose group bits may change
    (pruned entries keep theirs); keep: [N, C] bool or None (dense). → (fit with the new codes and ŵ, keep)."""
    W = Wb.clone()
    N, C = W.shape
    mu, a1, a2 = group_levels(fit)
    Q = torch.zeros_like(W)
    sign1, sign2, group = fit.sign1.clone(), fit.sign2.clone(), fit.group.clone()
    keep = None if keep is None else keep.clone()
    for j in range(C):
        if runs is not None and j % runs.m == 0 and j + runs.m <= C:
            r = slice(j, j + runs.m)
            w = W[:, r]
            q = nearest_level(w, mu[:, :, r], a1[:, :, r], a2[:, :, r])[0]
            g = _pick(q, group[:, r], movable[r][None, :], w)
            best = torch.where(g, q[1], q[0])
            keep[:, r] = runs.choose((w * w - (w - best) ** 2) * runs.weight[None, r])
        w = W[:, j]
        q, s1, s2 = nearest_level(w, mu[:, :, j], a1[:, :, j], a2[:, :, j])
        g = _pick(q, group[:, j], movable[j], w)
        if keep is not None:
            g = torch.where(keep[:, j], g, group[:, j])
        gi = g.long()[None]
        qj = q.gather(0, gi)[0]
        if keep is not None:
            qj = qj * keep[:, j]
        group[:, j] = g
        sign1[:, j] = s1.gather(0, gi)[0] > 0
        if fit.salient[j]:
            sign2[:, j] = s2.gather(0, gi)[0] > 0
        Q[:, j] = qj
        W[:, j + 1:] -= ((w - qj) / Ub[j, j])[:, None] * Ub[j, j + 1:][None, :]
    return BlockFit(Q, sign1, sign2, group, fit.salient, fit.alpha, fit.mu, fit.col_scale), keep


def design(fit: BlockFit, keep: Tensor | None) -> Tensor:
    """Φ [N, C, 12]: Ŵ_ij = Σ_p Φ_ijp θ_ip with θ_i = (μ, α₁, α₂) per (kind, group), index 6·kind + 3·group + k."""
    N, C = fit.sign1.shape
    kind = fit.salient.long()[None, :].expand(N, C)
    g = fit.group.long()
    dev = fit.sign1.device
    on = torch.ones(N, C, device=dev) if keep is None else keep.float()
    s1, s2 = fit.sign1.float() * 2 - 1, fit.sign2.float() * 2 - 1
    cs = fit.col_scale
    grp = fit.group.bool()
    c1 = torch.where(grp, cs[1, 0][None, :], cs[0, 0][None, :])
    c2 = torch.where(grp, cs[1, 1][None, :], cs[0, 1][None, :])
    base = (kind * 6 + g * 3)[..., None]
    Phi = torch.zeros(N, C, 12, device=dev)
    Phi.scatter_(2, base, on[..., None])
    Phi.scatter_(2, base + 1, (c1 * s1 * on)[..., None])
    Phi.scatter_(2, base + 2, (c2 * s2 * on * kind)[..., None])
    return Phi


def refit_scales(Wb: Tensor, fit: BlockFit, Ub: Tensor, mean_form: bool, keep: Tensor | None = None) -> BlockFit:
    """Step 2 of the module docstring: θ_i = argmin ‖(w_i − Φ_i θ_i) U_b⁻¹‖² (normal equations in float64 by Cholesky,
    with a 1e-9 relative ridge towards the current values, which keeps the unused ones; a row whose system fails
    keeps its values). Wb: [N, C] → fit (ŵ = Φθ)."""
    N, C = Wb.shape
    Phi = design(fit, keep)
    if not mean_form:
        Phi[..., 0::3] = 0
    theta0 = torch.cat([fit.mu[..., None], fit.alpha], -1).reshape(N, 12).double()
    Uinv = torch.linalg.solve_triangular(Ub.double(), torch.eye(C, dtype=torch.float64, device=Wb.device), upper=True)
    M = torch.einsum("ck,ncp->nkp", Uinv, Phi.double())                   # rows of Φ_i mapped by U_b⁻ᵀ
    y = Wb.double() @ Uinv
    G = M.transpose(1, 2) @ M
    ridge = 1e-9 * G.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None]
    L, info = torch.linalg.cholesky_ex(G + torch.diag_embed(ridge.expand(N, 12)))
    rhs = (M.transpose(1, 2) @ y[..., None]) + (ridge * theta0)[..., None]
    theta = torch.cholesky_solve(rhs, L)[..., 0]
    theta = torch.where((info == 0)[:, None] & torch.isfinite(theta).all(-1, keepdim=True), theta, theta0)
    theta = theta.float().reshape(N, 2, 2, 3)
    w_hat = (Phi * theta.reshape(N, 1, 12)).sum(-1)
    return BlockFit(w_hat, fit.sign1, fit.sign2, fit.group, fit.salient, theta[..., 1:].contiguous(),
                    theta[..., 0].contiguous(), fit.col_scale)


def polish(Wb: Tensor, fit: BlockFit, Ub: Tensor, rounds: int, movable: Tensor, mean_form: bool, scale_dtype: str,
           keep: Tensor | None = None, runs: RunPositions | None = None) -> tuple[BlockFit, Tensor | None]:
    """`rounds` rounds of codes then scales (module docstring), the scales rounded to scale_dtype as the block's
    fit is; a step is kept only if the exact loss went down, and the rounds stop at the first that gains nothing.
    Wb: [N, C]; fit: its rounded fit (ŵ 0 at pruned entries) → (fit, keep)."""
    best = exact_loss(Wb, fit.w_hat, Ub)
    for _ in range(rounds):
        gained = False
        coded, coded_keep = sequential_codes(Wb, fit, Ub, movable, keep, runs)
        loss = exact_loss(Wb, coded.w_hat, Ub)
        if loss < best:
            fit, keep, best, gained = coded, coded_keep, loss, True
        scaled = round_scales(refit_scales(Wb, fit, Ub, mean_form, keep), scale_dtype)
        if keep is not None:
            scaled.w_hat = scaled.w_hat * keep
        loss = exact_loss(Wb, scaled.w_hat, Ub)
        if loss < best:
            fit, best, gained = scaled, loss, True
        if not gained:
            break
    return fit, keep
