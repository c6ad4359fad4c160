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
    """Each row's values sorted ascending, v: [N, n], and for K candidate sets one prefix table
    tab: [3, N, K or 1, n + 1] — the count, Σv and Σv² (first dim) of the set's members among the first
    t sorted values. Every set statistic below is a difference of two table entries; the three sums
    come from one gather."""

    def __init__(self, v: Tensor, tab: Tensor):
        self.v, self.tab = v, tab

    @classmethod
    def plain(cls, v: Tensor) -> SortedRows:
        """All values of each row are members (one candidate set)."""
        v, _ = torch.sort(v, dim=-1)
        pw = torch.stack([torch.ones_like(v), v, v * v])                         # [3, N, n]
        tab = torch.cat([torch.zeros_like(pw[..., :1]), pw.cumsum(-1)], -1)      # [3, N, n + 1]
        return cls(v, tab[:, :, None])

    def find(self, c: Tensor, right: bool = False) -> Tensor:
        """Index of the first value ≥ c (> c if right), c: [N, K] → [N, K]."""
        return torch.searchsorted(self.v, c.contiguous(), right=right)

    def at(self, *idx: Tensor) -> list[Tensor]:
        """Table entries at sorted positions idx (each [N, K]) → one [powers, N, K] per position."""
        i = torch.cat(idx, -1)                                                    # [N, K·P]
        N, KP = i.shape
        pw = self.tab.shape[0]
        if self.tab.shape[2] == 1:
            g = self.tab[:, :, 0].gather(2, i[None].expand(pw, N, KP))
        else:
            K = idx[0].shape[1]
            g = self.tab.gather(3, i.view(N, len(idx), K).transpose(1, 2)[None].expand(pw, N, K, len(idx)))
            return list(g.unbind(-1))
        return list(g.chunk(len(idx), -1))

    def sums(self, a: Tensor, b: Tensor) -> Tensor:
        """(count, Σv, Σv²) of the members with sorted index in [a, b): [3, N, K]."""
        ta, tb = self.at(a, b)
        return tb - ta

    def abs_sum(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """Σ |v_i − c| over the set's members with sorted index in [a, b) (a ≤ b, all [N, K])."""
        t = torch.minimum(torch.maximum(self.find(c), a), b)
        ta, tt, tb = self.at(a, t, b)
        lo, hi = tt - ta, tb - tt
        return (c * lo[0] - lo[1]) + (hi[1] - c * hi[0])


def _union_err(s: SortedRows, ivals: list[tuple[Tensor, Tensor]], order: int) -> Tensor:
    """err_order over the set's members in the union of disjoint sorted-index intervals: [N, K]."""
    n, s1, s2 = sum(s.sums(a, b) for a, b in ivals).unbind(0)
    mu = _safe_div(s1, n)
    sq = s2 - n * mu * mu
    a1 = _safe_div(sum(s.abs_sum(a, b, mu) for a, b in ivals), n)
    err = sq - n * a1 * a1
    if order == 1:
        return err
    t = s.find(mu)                                              # first index with v ≥ μ₁
    hi = [(torch.maximum(a, t).clamp(max=b), b) for a, b in ivals]
    lo = [(a, torch.minimum(b, t).clamp(min=a)) for a, b in ivals]
    npos = sum(s.sums(a, b)[0] for a, b in hi)
    mu2 = _safe_div(-a1 * (2 * npos - n), n)
    # r' − μ₂ = v − (μ₁ ± α₁ + μ₂) on the v ≥ μ₁ / v < μ₁ parts
    a2 = sum(s.abs_sum(a, b, mu + a1 + mu2) for a, b in hi) + sum(s.abs_sum(a, b, mu - a1 + mu2) for a, b in lo)
    a2 = _safe_div(a2, n)
    return err - n * mu2 * mu2 - n * a2 * a2


def _whole_err(s: SortedRows, tot: Tensor, order: int) -> Tensor:
    """err_order over all members of each set, [N, K]: `_union_err(s, [(0, n)], order)` with only the
    three table lookups it needs (at t = first index ≥ μ₁ and at the two second-stage centres).
    s.tab needs the count and Σv tables only; tot: [3, N, K] the member count, Σv and Σv²."""
    n, s1, s2 = tot
    mu = _safe_div(s1, n)
    t = s.find(mu)
    (at_t,) = s.at(t)
    hi = tot[:2] - at_t                                          # count, Σv over members ≥ μ₁
    a1 = _safe_div((mu * at_t[0] - at_t[1]) + (hi[1] - mu * hi[0]), n)
    err = s2 - n * mu * mu - n * a1 * a1
    if order == 1:
        return err
    mu2 = _safe_div(-a1 * (2 * hi[0] - n), n)
    c_hi, c_lo = mu + a1 + mu2, mu - a1 + mu2                    # r' − μ₂ = v − c on the two sides of μ₁
    at_h, at_l = s.at(torch.maximum(s.find(c_hi), t), torch.minimum(s.find(c_lo), t))
    above = (c_hi * (at_h[0] - at_t[0]) - (at_h[1] - at_t[1])) + ((tot[1] - at_h[1]) - c_hi * (tot[0] - at_h[0]))
    below = (c_lo * at_l[0] - at_l[1]) + ((at_t[1] - at_l[1]) - c_lo * (at_t[0] - at_l[0]))
    a2 = _safe_div(above + below, n)
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
        wk = wr[:, :kmax]
        pw = torch.stack([torch.ones_like(wk), wk, wk * wk])                  # [3, R, i]
        below = (ks[:, None] > torch.arange(kmax, device=w.device)[None, :]).to(w.dtype)   # [K, i]: i < k
        tab = below @ (step[None] * pw[:2, ..., None])                         # [2, R, K, C + 1]
        tot = pw @ below.T                                                     # [3, R, K]
        full = SortedRows.plain(wr)
        row_tot = full.tab[:, :, 0, -1:]                                       # [3, R, 1]
        inside = SortedRows(v, tab)
        rest = SortedRows(v, full.tab[:2] - tab)
        total += (_whole_err(inside, tot, order) + _whole_err(rest, row_tot - tot, order)).sum(0)
    return total
