"""Exact, fast mask-search errors for the plain sign binarizers (BiLLM's order 1 / order 2).

For a member set G of a row and the sign binarizer ŵ = α·sign(w − μ) + μ (μ = mean, α = mean|w − μ|):
    err₁(G) = Σ w² − n μ² − n α²
and for the residual binarizer (second stage on r' = sign(r)(|r| − α₁), r = w − μ₁):
    μ₂ = −α₁ (n₊ − n₋)/n,  α₂ = mean|r' − μ₂|,  err₂(G) = Σ r² − n α₁² − n μ₂² − n α₂²
with n₊ = #{w ≥ μ₁}. Only sums of w, w² and |w − c| over G are needed.

`split_errors` exploits that a magnitude split {|w| ≥ p} is a union of two intervals of each row's
*sorted* values, so every threshold costs O(log C) per row via prefix sums; `masked_errors` handles
arbitrary masks (salient-column candidates) with a few full passes instead of materialising Ŵ.
These equal ‖W − Ŵ‖² of `binarizers.order1/order2` up to float rounding (tested).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _safe_div(a: Tensor, n: Tensor) -> Tensor:
    return torch.where(n > 0, a / n.clamp_min(1), torch.zeros_like(a))


# ---------------------------------------------------------------- arbitrary masks
def masked_errors(w: Tensor, m: Tensor, order: int) -> Tensor:
    """Per-candidate error Σ_rows err_order(G_r), w: [N, C], m: [K, N, C] float → [K]."""
    n = m.sum(-1)
    mu = _safe_div((w * m).sum(-1), n)
    r = (w - mu[..., None]) * m                       # zero off-group
    sq = (r * r).sum(-1)
    a1 = _safe_div(r.abs().sum(-1), n)
    err = sq - n * a1 * a1
    if order == 1:
        return err.sum(-1)
    npos = ((r >= 0) & (m > 0)).sum(-1)
    mu2 = _safe_div(-a1 * (2 * npos - n), n)
    r2 = torch.where(r >= 0, r - a1[..., None], r + a1[..., None]) - mu2[..., None]
    a2 = _safe_div((r2.abs() * m).sum(-1), n)
    return (err - n * mu2 * mu2 - n * a2 * a2).sum(-1)


# ---------------------------------------------------------------- magnitude splits on sorted rows
class SortedRows:
    """Each row's member values sorted ascending, with prefix sums. v: [N, n]."""

    def __init__(self, v: Tensor):
        self.v, _ = torch.sort(v, dim=-1)
        z = torch.zeros(v.shape[0], 1, dtype=v.dtype, device=v.device)
        self.p1 = torch.cat([z, self.v.cumsum(-1)], -1)
        self.p2 = torch.cat([z, (self.v * self.v).cumsum(-1)], -1)

    def find(self, c: Tensor, right: bool = False) -> Tensor:
        """Index of the first value ≥ c (> c if right), c: [N, K] → [N, K]."""
        return torch.searchsorted(self.v, c.contiguous(), right=right)

    def seg(self, p: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return p.gather(1, b) - p.gather(1, a)

    def abs_sum(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """Σ_{i ∈ [a, b)} |v_i − c| per row and candidate (a ≤ b, all [N, K])."""
        t = torch.minimum(torch.maximum(self.find(c), a), b)
        below = c * (t - a) - self.seg(self.p1, a, t)
        above = self.seg(self.p1, t, b) - c * (b - t)
        return below + above


def _union_err(s: SortedRows, ivals: list[tuple[Tensor, Tensor]], order: int) -> Tensor:
    """err_order over the union of disjoint index intervals [a, b) of each row: [N, K]."""
    n = sum((b - a) for a, b in ivals).to(s.v.dtype)
    s1 = sum(s.seg(s.p1, a, b) for a, b in ivals)
    s2 = sum(s.seg(s.p2, a, b) for a, b in ivals)
    mu = _safe_div(s1, n)
    sq = s2 - n * mu * mu
    a1 = _safe_div(sum(s.abs_sum(a, b, mu) for a, b in ivals), n)
    err = sq - n * a1 * a1
    if order == 1:
        return err
    t = s.find(mu)                                              # first index with v ≥ μ₁
    hi = [(torch.maximum(a, t).clamp(max=b), b) for a, b in ivals]
    lo = [(a, torch.minimum(b, t).clamp(min=a)) for a, b in ivals]
    npos = sum((b - a) for a, b in hi).to(s.v.dtype)
    mu2 = _safe_div(-a1 * (2 * npos - n), n)
    # r' − μ₂ = v − (μ₁ ± α₁ + μ₂) on the v ≥ μ₁ / v < μ₁ parts
    a2 = sum(s.abs_sum(a, b, mu + a1 + mu2) for a, b in hi) + sum(s.abs_sum(a, b, mu - a1 + mu2) for a, b in lo)
    a2 = _safe_div(a2, n)
    return err - n * mu2 * mu2 - n * a2 * a2


def split_errors(v: Tensor, thresholds: Tensor, order: int) -> Tensor:
    """Σ_rows [err(|v| ≥ p) + err(|v| < p)] for each threshold p. v: [N, n] member values of each
    row (every row has the same count n), thresholds: [K] → [K]."""
    s = SortedRows(v)
    N, n = v.shape
    p = thresholds[None, :].expand(N, -1)
    lo = s.find(-p, right=True)              # v ≤ −p  ⇔  index < lo
    hi = s.find(p)                           # v ≥ p   ⇔  index ≥ hi
    zero = torch.zeros_like(lo)
    end = torch.full_like(lo, n)
    big = _union_err(s, [(zero, lo), (hi, end)], order)
    small = _union_err(s, [(lo, hi)], order)
    return (big + small).sum(0)
