"""Binarize one column block: choose its masks, fit every group, optionally ARB-X refine.

Groups are indexed (kind, g): kind 1 = salient columns (order 2), kind 0 = the rest (order 1);
g is the group bit (magnitude split). Output is in the LinearResult slot layout for one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from arbq import dtypes
from arbq.methods import masks as mk
from arbq.methods.binarizers import Fit, _nearest_levels
from arbq.methods.config import BinarizeConfig
from arbq.methods.result import LinearResult

if TYPE_CHECKING:
    from arbq.methods.binary import BinaryMethod as Method
    from arbq.methods.binary import GroupFit

Tensor = torch.Tensor


def fit_on_columns(fn: GroupFit, W: Tensor, m: Tensor, iters: int) -> Fit:
    """fn(W, m, iters) computed on the columns that hold a member of m only, then scattered back to
    [N, C] (w_hat 0, signs +1, col scale 1 elsewhere). Every statistic is a member sum, so the
    result equals the full-width fit; the salient part is ~20% of a block's columns."""
    cols = m.any(0)
    if bool(cols.all()):
        return fn(W, m, iters)
    f = fn(W[:, cols], m[:, cols], iters)
    N, C = W.shape
    O = f.signs.shape[0]
    w_hat = W.new_zeros(N, C)
    w_hat[:, cols] = f.w_hat
    signs = W.new_ones(O, N, C)
    signs[:, :, cols] = f.signs
    col = W.new_ones(O, C)
    col[:, cols] = f.col
    return Fit(w_hat, signs, f.alpha, f.mu, col)


@dataclass
class BlockFit:
    """One block's result. w_hat, sign1, sign2, group: [N, C]; salient: [C];
    alpha: [N, 2, 2, 2] (kind, group, order); mu: [N, 2, 2]; col_scale: [2, 2, C] (group, order)."""

    w_hat: Tensor
    sign1: Tensor
    sign2: Tensor
    group: Tensor
    salient: Tensor
    alpha: Tensor
    mu: Tensor
    col_scale: Tensor


def split_thresholds(T: Tensor, cols: Tensor, points: int, with_zeros: bool) -> Tensor:
    """Candidate thresholds for a magnitude split of the columns `cols`: quantiles of |T| over those
    columns, or (with_zeros, the reference's non-salient split) of the whole block with the other
    columns zeroed."""
    vals = (T.abs() * cols[None, :]) if with_zeros else T.abs()[:, cols]
    return mk.quantile_thresholds(vals.flatten(), points)


def choose_masks(W: Tensor, d: Tensor | None, S: Tensor | None, method: Method, cfg: BinarizeConfig
                 ) -> tuple[Tensor, Tensor]:
    """(salient [C] bool, group [N, C] bool) for block W: [N, C]; d = diag of the inverse-Hessian
    Cholesky factor on the block, S = H[block, block] (used when the split is scored by output error).
    The search runs on T = W, or on T = the salience matrix when cfg.search_on == "salience". Parts
    already decided while a split is searched ("fixed") are fitted with cfg.iters refinements, and
    only by scorers that need them (an error that couples groups)."""
    N, C = W.shape
    if not method.search:
        return torch.zeros(C, dtype=torch.bool), torch.zeros(N, C, dtype=torch.bool)
    scorer = mk.PlainScorer() if cfg.search_fit == "plain" else \
        mk.FitScorer(method.fit1, method.fit2, cfg.search_iters, mk.weight_error)
    split_scorer = scorer
    if cfg.split_error == "output" and S is not None:
        split_scorer = mk.FitScorer(method.fit1, method.fit2, cfg.search_iters, mk.output_error(S))
    T = mk.salience_matrix(W, d, cfg.salient) if cfg.search_on == "salience" else W
    salient = mk.search_salient(T, mk.column_scores(W, d, cfg.salient), cfg.max_salient, scorer)
    sal = salient[None, :].expand(N, C)
    if not cfg.group_split:
        return salient, torch.zeros(N, C, dtype=torch.bool)
    ps = split_thresholds(T, ~salient, cfg.split_points, cfg.split_quantiles == "with_zeros")
    group = split_scorer.split(T, ~salient, lambda: fit_on_columns(method.fit2, T, sal, cfg.iters).w_hat, 1, ps)
    if cfg.cgb and salient.any():
        def fixed() -> Tensor:
            return sum(fit_on_columns(method.fit1, T, ~sal & g, cfg.iters).w_hat for g in (group, ~group))
        group = group | scorer.split(T, salient, fixed, 2, split_thresholds(T, salient, cfg.split_points, False))
    return salient, group


# what a fit rounds its scales to, block by block. fp8's per-tensor factor is known only once the linear is done,
# so its blocks round to fp16 and the finished result is rounded to the stored fp8 values (Layout.stored_values)
SCALE_DTYPES = {k: dtypes.BY_NAME[k] for k in ("fp16", "bf16", "fp32")} | {"fp8": dtypes.BY_NAME["fp16"]}


def round_scales(fit: BlockFit, scale_dtype: str) -> BlockFit:
    """Round α, μ and the column scales to scale_dtype (values kept in float32) and recompute
    ŵ = μ + α₁c₁s¹ + k·α₂c₂s² from the rounded values: what `arbq pack` will store."""
    if scale_dtype == "fp32":
        return fit
    dt = SCALE_DTYPES[scale_dtype]
    rnd = lambda x: x.to(dt).float()  # noqa: E731
    alpha, mu, col = rnd(fit.alpha), rnd(fit.mu), rnd(fit.col_scale)
    res = LinearResult(fit.sign1, fit.sign2, fit.group, fit.salient, alpha[:, None], mu[:, None], col,
                       blocksize=fit.w_hat.shape[1])
    return BlockFit(res.dequantize(), fit.sign1, fit.sign2, fit.group, fit.salient, alpha, mu, col)


def regroups(method: Method, cfg: BinarizeConfig) -> bool:
    """Whether the method's group bits may be re-assigned after its fit (it has a magnitude split)."""
    return method.search and cfg.group_split


def fit_block(W: Tensor, salient: Tensor, group: Tensor, S: Tensor | None, method: Method,
              cfg: BinarizeConfig, keep: Tensor | None = None) -> BlockFit:
    """Fit every non-empty (kind, group) of the block with the method's binarizers (cfg.iters ARB
    iterations), then cfg.x_iters ARB-X iterations when the method refines against S. keep: [N, C] bool,
    the entries that survive pruning (None = all); pruned entries belong to no group (ŵ = 0 there).
    cfg.regroup > 0 (methods with a magnitude split): that many rounds of `regroup` + re-fit after."""
    fit = _fit_groups(W, salient, group, S, method, cfg, keep)
    if not (cfg.regroup and regroups(method, cfg)):
        return fit
    for _ in range(cfg.regroup):
        new = regroup(W, fit, keep, cfg.cgb)
        if torch.equal(new, fit.group):
            break
        fit = _fit_groups(W, salient, new, S, method, cfg, keep)
    return fit


def group_levels(fit: BlockFit) -> tuple[Tensor, Tensor, Tensor]:
    """(μ, a₁, a₂), each [2 groups, N, C]: entry (i, j) of group g takes the values μ + a₁s₁ + a₂s₂, s ∈ {±1}, with
    a = α·c of its kind (a₂ = 0 outside the salient columns)."""
    sal = fit.salient[None, :]
    mu = torch.stack([torch.where(sal, fit.mu[:, 1, g, None], fit.mu[:, 0, g, None]) for g in (0, 1)])
    a1 = torch.stack([torch.where(sal, fit.alpha[:, 1, g, 0, None], fit.alpha[:, 0, g, 0, None])
                      * fit.col_scale[g, 0][None, :] for g in (0, 1)])
    a2 = torch.stack([torch.where(sal, fit.alpha[:, 1, g, 1, None] * fit.col_scale[g, 1][None, :], 0.0)
                      for g in (0, 1)])
    return mu, a1, a2


def nearest_level(w: Tensor, mu: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The nearest level of w [..] in either group ([2, ..] each): (q, s₁, s₂), the stored signs s = ±1."""
    s1, s2 = _nearest_levels(w[None] - mu, a1, a2)
    return mu + a1 * s1 + a2 * s2, s1, s2


def group_candidates(W: Tensor, fit: BlockFit) -> Tensor:
    """ŵ of every weight of W [N, C] under either group's current parameters, [2, N, C]: with the levels
    l_k = |α_k c_k| of its kind (salient columns: order 2, else order 1) and the nearest signs,

        ŵ_g = μ_g + s·l_1 (+ s'·l_2),   s, s' ∈ {±1} minimising (w − ŵ_g)²   (binarizers._nearest_levels)."""
    return nearest_level(W, *group_levels(fit))[0]


def nearest_group(W: Tensor, fit: BlockFit, cgb: bool) -> tuple[Tensor, Tensor]:
    """(cost [2, N, C] = (w − ŵ_g)² under either group's current parameters, nearer [N, C]: the group bit
    whose parameters represent w with the smaller error; salient columns keep theirs unless CGB splits them)."""
    cand = group_candidates(W, fit)
    cost = (W[None] - cand) ** 2
    fixed = fit.salient[None, :].expand_as(W) if not cgb else torch.zeros_like(fit.group)
    return cost, torch.where(fixed, fit.group, cost[1] < cost[0])


def regroup(W: Tensor, fit: BlockFit, keep: Tensor | None, cgb: bool) -> Tensor:
    """New group bits [N, C]: every kept weight joins the group whose current parameters represent it with
    the smaller error (w − ŵ_g)² (a Lloyd step of the two-group split; the magnitude-threshold split of
    BiLLM is its start). The group bit is stored per weight, so any assignment packs; salient columns
    keep theirs unless CGB splits them, pruned entries keep theirs (they belong to no group)."""
    nearer = nearest_group(W, fit, cgb)[1]
    return nearer if keep is None else torch.where(keep, nearer, fit.group)


def _fit_groups(W: Tensor, salient: Tensor, group: Tensor, S: Tensor | None, method: Method,
                cfg: BinarizeConfig, keep: Tensor | None) -> BlockFit:
    """fit_block's fit on fixed masks."""
    N, C = W.shape
    sal = salient[None, :].expand(N, C)
    fits: list[tuple[int, int, Tensor, Fit]] = []
    for kind, kmask in ((0, ~sal), (1, sal)):
        for g, gmask in ((0, ~group), (1, group)):
            m = kmask & gmask if keep is None else kmask & gmask & keep
            if m.any():
                fn = method.fit2 if kind else method.fit1
                fits.append((kind, g, m, fit_on_columns(fn, W, m, cfg.iters)))
    if method.x_refine and S is not None and cfg.x_iters:
        from arbq.methods.xrefine import x_refine

        refined = x_refine(W, S, [(m, f) for _, _, m, f in fits], cfg.x_iters, method.mean_form)
        fits = [(k, g, m, f) for (k, g, m, _), f in zip(fits, refined, strict=True)]

    out = BlockFit(w_hat=torch.zeros_like(W), sign1=torch.ones(N, C, dtype=torch.bool),
                   sign2=torch.zeros(N, C, dtype=torch.bool), group=group.clone(), salient=salient.clone(),
                   alpha=torch.zeros(N, 2, 2, 2), mu=torch.zeros(N, 2, 2), col_scale=torch.ones(2, 2, C))
    for kind, g, m, f in fits:
        out.w_hat += f.w_hat
        out.sign1 = torch.where(m, f.signs[0] > 0, out.sign1)
        if kind:
            out.sign2 = torch.where(m, f.signs[1] > 0, out.sign2)
        order = f.signs.shape[0]
        out.alpha[:, kind, g, :order] = f.alpha.T
        out.mu[:, kind, g] = f.mu
        cols = m.any(0)
        out.col_scale[g, :order] = torch.where(cols[None, :], f.col, out.col_scale[g, :order])
    if not method.mean_form:
        out.mu.zero_()
    return out
