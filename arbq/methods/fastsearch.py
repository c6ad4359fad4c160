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


# ---------------------------------------------------------------- sets as intervals of sorted rows
class SortedRows:
    """Each row's values sorted ascending, v: [N, n], and for K candidate sets prefix tables
    c0, c1, c2: [N, K or 1, n + 1] — the count, Σv and Σv² of the set's members among the first t
    sorted values. Every set statistic below is then a difference of two table entries."""

    def __init__(self, v: Tensor, c0: Tensor, c1: Tensor, c2: Tensor):
        self.v, self.c0, self.c1, self.c2 = v, c0, c1, c2

    @classmethod
    def plain(cls, v: Tensor) -> SortedRows:
        """All values of each row are members (one candidate set)."""
        v, _ = torch.sort(v, dim=-1)
        z = torch.zeros(v.shape[0], 1, dtype=v.dtype, device=v.device)
        ones = torch.ones_like(v)
        pre = [torch.cat([z, x.cumsum(-1)], -1)[:, None, :] for x in (ones, v, v * v)]
        return cls(v, *pre)

    def find(self, c: Tensor, right: bool = False) -> Tensor:
        """Index of the first value ≥ c (> c if right), c: [N, K] → [N, K]."""
        return torch.searchsorted(self.v, c.contiguous(), right=right)

    def seg(self, table: Tensor, a: Tensor, b: Tensor) -> Tensor:
        t = table.expand(a.shape[0], a.shape[1], table.shape[-1])
        return (t.gather(2, b[..., None]) - t.gather(2, a[..., None]))[..., 0]

    def abs_sum(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """Σ |v_i − c| over the set's members with sorted index in [a, b) (a ≤ b, all [N, K])."""
        t = torch.minimum(torch.maximum(self.find(c), a), b)
        below = c * self.seg(self.c0, a, t) - self.seg(self.c1, a, t)
        above = self.seg(self.c1, t, b) - c * self.seg(self.c0, t, b)
        return below + above


def _union_err(s: SortedRows, ivals: list[tuple[Tensor, Tensor]], order: int) -> Tensor:
    """err_order over the set's members in the union of disjoint sorted-index intervals: [N, K]."""
    n = sum(s.seg(s.c0, a, b) for a, b in ivals)
    s1 = sum(s.seg(s.c1, a, b) for a, b in ivals)
    s2 = sum(s.seg(s.c2, a, b) for a, b in ivals)
    mu = _safe_div(s1, n)
    sq = s2 - n * mu * mu
    a1 = _safe_div(sum(s.abs_sum(a, b, mu) for a, b in ivals), n)
    err = sq - n * a1 * a1
    if order == 1:
        return err
    t = s.find(mu)                                              # first index with v ≥ μ₁
    hi = [(torch.maximum(a, t).clamp(max=b), b) for a, b in ivals]
    lo = [(a, torch.minimum(b, t).clamp(min=a)) for a, b in ivals]
    npos = sum(s.seg(s.c0, a, b) for a, b in hi)
    mu2 = _safe_div(-a1 * (2 * npos - n), n)
    # r' − μ₂ = v − (μ₁ ± α₁ + μ₂) on the v ≥ μ₁ / v < μ₁ parts
    a2 = sum(s.abs_sum(a, b, mu + a1 + mu2) for a, b in hi) + sum(s.abs_sum(a, b, mu - a1 + mu2) for a, b in lo)
    a2 = _safe_div(a2, n)
    return err - n * mu2 * mu2 - n * a2 * a2


def split_errors(v: Tensor, thresholds: Tensor, order: int) -> Tensor:
    """Σ_rows [err(|v| ≥ p) + err(|v| < p)] for each threshold p. v: [N, n] member values of each
    row (every row has the same count n), thresholds: [K] → [K]."""
    s = SortedRows.plain(v)
    N, n = v.shape
    p = thresholds[None, :].expand(N, -1)
    lo = s.find(-p, right=True)              # v ≤ −p  ⇔  index < lo
    hi = s.find(p)                           # v ≥ p   ⇔  index ≥ hi
    zero = torch.zeros_like(lo)
    end = torch.full_like(lo, n)
    big = _union_err(s, [(zero, lo), (hi, end)], order)
    small = _union_err(s, [(lo, hi)], order)
    return (big + small).sum(0)


def prefix_set_errors(w: Tensor, rank: Tensor, ks: Tensor, order: int, rows_per_chunk: int = 256) -> Tensor:
    """Σ_rows [err(S_k) + err(rest)] for the column sets S_k = {j : rank_j < k}, k ∈ ks.
    w: [N, C]; rank: [C] (0 = first column to include); ks: [K] → [K].

    Tables: with the columns in rank order, member i of row r sits at sorted position ρ_ri, so the
    table of S_k at t is Σ_{i<k} [ρ_ri < t]·w_riᵖ: a cumulative sum over i of step functions."""
    N, C = w.shape
    order_cols = torch.argsort(rank)
    total = torch.zeros(len(ks), dtype=w.dtype, device=w.device)
    for r0 in range(0, N, rows_per_chunk):
        wr = w[r0: r0 + rows_per_chunk, order_cols]                    # [R, C] columns in rank order
        R = wr.shape[0]
        v, pos = torch.sort(wr, dim=-1)
        rho = torch.empty_like(pos)
        rho.scatter_(1, pos, torch.arange(C, device=w.device).expand(R, C))
        kmax = int(ks.max())
        t = torch.arange(C + 1, device=w.device)
        step = (t[None, None, :] > rho[:, :kmax, None]).to(w.dtype)          # [R, i, t]: ρ_i < t
        tables = []
        for power in (0, 1, 2):
            cum = (step * (wr[:, :kmax] ** power)[..., None]).cumsum(1)     # Σ_{i ≤ row} over members
            tables.append(cum[:, ks - 1, :])                                 # [R, K, C + 1]
        full = SortedRows.plain(wr)
        inside = SortedRows(v, *tables)
        rest = SortedRows(v, *(f - t for f, t in zip((full.c0, full.c1, full.c2), tables, strict=True)))
        zero = torch.zeros(R, len(ks), dtype=torch.long, device=w.device)
        end = torch.full_like(zero, C)
        total += (_union_err(inside, [(zero, end)], order) + _union_err(rest, [(zero, end)], order)).sum(0)
    return total
