"""Mask search for one column block (BiLLM's structure, with ARB-LLM's CGB extension).

A block W: [N, C] is split into
  salient columns (a column bitmap)   — binarized with order 2 (two sign bits per weight)
  non-salient columns                 — binarized with order 1
and each kind further into two groups by a magnitude threshold |w| ≥ p ("sparse") / < p
("concentrated"): always for the non-salient part, and for the salient part with CGB.

Two interchangeable scorers rank the candidates:
  PlainScorer — BiLLM's plain sign binarizers and the weight error ‖W − Ŵ‖², in closed form
                (`fastsearch`): exact and cheap; the default for every method.
  FitScorer   — the method's own group binarizers (with `search_iters` refinements) and either
                the weight error or the output error tr(R S Rᵀ) (the reference's non-salient split
                for ARB-X: its order-1 candidates with 0 refinements are the plain binarizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from arbq.methods import fastsearch as fs

if TYPE_CHECKING:
    from arbq.methods.binary import GroupFit

Tensor = torch.Tensor
ErrFn = Callable[[Tensor], Tensor]      # residual [..., N, C] → error [...]
Fixed = Callable[[], Tensor]             # the fit [N, C] of the columns a split leaves alone


def weight_error(R: Tensor) -> Tensor:
    """‖R‖² over the last two dims."""
    return (R * R).sum((-1, -2))


def output_error(S: Tensor) -> ErrFn:
    """tr(R S Rᵀ) over the last two dims: the block's output error on the calibration inputs."""
    return lambda R: ((R @ S) * R).sum((-1, -2))


def salience_matrix(W: Tensor, d: Tensor | None, metric: str) -> Tensor:
    """The matrix a metric ranks columns by, [N, C]: W itself ("magnitude") or W² / d² ("hessian",
    d = diag U). The reference code also runs its whole mask search on it."""
    if metric == "magnitude" or d is None:
        return W
    return W * W / (d * d)[None, :]


def column_scores(W: Tensor, d: Tensor | None, metric: str) -> Tensor:
    """Salience per column: Σ_rows |W| ("magnitude") or Σ_rows W² / d² ("hessian")."""
    return salience_matrix(W, d, metric).abs().sum(0)


def quantile_thresholds(values: Tensor, points: int) -> Tensor:
    """`points` evenly spaced quantiles from 10% to 90% of a 1-D tensor."""
    q = torch.linspace(0.1, 0.9, points, device=values.device, dtype=values.dtype)
    if values.numel() > 8_000_000:   # torch.quantile's input limit: subsample evenly
        values = values[:: values.numel() // 8_000_000 + 1]
    return torch.quantile(values, q)


def _chunks(n: int, N: int, C: int) -> list[slice]:
    """Candidate batches so that one [c, N, C] float32 tensor stays near 8 MB."""
    step = max(1, min(128, (2 << 20) // max(1, N * C)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


@dataclass
class PlainScorer:
    """Closed-form errors of BiLLM's plain binarizers (order 2 salient, order 1 otherwise)."""

    def salient_errors(self, W: Tensor, rank: Tensor, ks: Tensor) -> Tensor:
        """[K] error of order2(salient) + order2(rest), salient = {j : rank_j < k} for k in ks."""
        return fs.prefix_set_errors(W, rank, ks, 2)

    def split(self, W: Tensor, cols: Tensor, fixed: Fixed, order: int, ps: Tensor) -> Tensor:
        """Group bit [N, C] on the columns `cols` ([C] bool): |w| ≥ the best of the thresholds ps.
        The weight error is a sum over groups, so the fit of the other columns (`fixed`) is not needed."""
        p = ps[int(torch.argmin(fs.split_errors(W[:, cols], ps, order)))]
        return (W.abs() >= p) & cols[None, :]


@dataclass
class FitScorer:
    """Errors of the method's own binarizers, `iters` refinements each, scored by `err`."""

    fit1: GroupFit
    fit2: GroupFit
    iters: int
    err: ErrFn

    def salient_errors(self, W: Tensor, rank: Tensor, ks: Tensor) -> Tensor:
        N, C = W.shape
        sal_cols = rank[None, :] < ks[:, None]
        out = []
        for sl in _chunks(len(sal_cols), N, C):
            sal = sal_cols[sl, None, :].expand(-1, N, C)
            R = W - self.fit2(W, sal, self.iters).w_hat - self.fit2(W, ~sal, self.iters).w_hat
            out.append(self.err(R))
        return torch.cat(out)

    def split(self, W: Tensor, cols: Tensor, fixed: Fixed, order: int, ps: Tensor) -> Tensor:
        """As PlainScorer.split; `fixed()` is the fit [N, C] of the block's other columns."""
        N, C = W.shape
        rest = W - fixed()
        fit = self.fit2 if order == 2 else self.fit1
        mag = W.abs()
        member = cols[None, :].expand(N, C)
        out = []
        for sl in _chunks(len(ps), N, C):
            big = (mag[None] >= ps[sl, None, None]) & member[None]
            small = member[None] & ~big
            out.append(self.err(rest - fit(W, big, self.iters).w_hat - fit(W, small, self.iters).w_hat))
        return (mag >= ps[int(torch.argmin(torch.cat(out)))]) & member


def search_salient(W: Tensor, scores: Tensor, kmax: int, scorer: PlainScorer | FitScorer) -> Tensor:
    """Salient-column bitmap [C]: the top-k columns by score, k ∈ 1..kmax (< C) of least error."""
    C = W.shape[1]
    kmax = min(kmax, C - 1)
    if kmax < 1:
        return torch.zeros(C, dtype=torch.bool, device=W.device)
    rank = torch.empty(C, dtype=torch.long, device=W.device)
    rank[torch.argsort(scores, descending=True, stable=True)] = torch.arange(C, device=W.device)
    ks = torch.arange(1, kmax + 1, device=W.device)
    errs = scorer.salient_errors(W, rank, ks)
    return rank < ks[int(torch.argmin(errs))]
