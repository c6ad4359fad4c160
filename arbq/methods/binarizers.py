"""Group binarizers: pure tensor math on one masked group of weights, batched over leading dims.

Shapes: w, m are [..., N, C] (rows × block columns; leading dims batch mask candidates). m is the
group's membership mask (bool); every statistic of row r is taken over the row's members only
("masked"), and a row without members gets 0. Signs are ±1 (sign(0) = +1).

A `Fit` of order o reconstructs, on members only,
    mean form (sign / billm / arb):  ŵ = μ_r + Σ_k α_{k,r} b_k
    RC form   (arb-rc):              ŵ = Σ_k α_{k,r} · c_{k,j} · b_k        (μ ≡ 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Fit:
    """w_hat: [..., N, C] (0 off-group); signs: [..., O, N, C] ±1; alpha: [..., O, N];
    mu: [..., N]; col: [..., O, C] column scales (ones unless RC)."""

    w_hat: Tensor
    signs: Tensor
    alpha: Tensor
    mu: Tensor
    col: Tensor


def sgn(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (an empty group)."""
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def mmean(x: Tensor, m: Tensor) -> Tensor:
    """Masked row mean: [..., N, C] → [..., N]."""
    return _div((x * m).sum(-1), m.sum(-1).to(x.dtype))


def _ones_col(w: Tensor, order: int) -> Tensor:
    return torch.ones(*w.shape[:-2], order, w.shape[-1], dtype=w.dtype, device=w.device)


# ---------------------------------------------------------------- mean form: sign / BiLLM / ARB
def order1(w: Tensor, m: Tensor) -> Fit:
    """Sign binarization: μ = mean w, α = mean |w − μ|, b = sign(w − μ), ŵ = α b + μ."""
    mu = mmean(w, m)
    r = w - mu[..., None]
    b = sgn(r)
    alpha = mmean(r.abs(), m)
    w_hat = (alpha[..., None] * b + mu[..., None]) * m
    return Fit(w_hat, b.unsqueeze(-3), alpha.unsqueeze(-2), mu, _ones_col(w, 1))


def order2(w: Tensor, m: Tensor) -> Fit:
    """BiLLM residual binarization: ŵ = order1(w) + order1(w − order1(w)); μ = μ₁ + μ₂."""
    f1 = order1(w, m)
    f2 = order1(w - f1.w_hat, m)
    return Fit(f1.w_hat + f2.w_hat, torch.cat([f1.signs, f2.signs], -3),
               torch.cat([f1.alpha, f2.alpha], -2), f1.mu + f2.mu, _ones_col(w, 2))


def _nearest_levels(r: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
    """Signs (b₁, b₂) ∈ {±1}² minimising (r − a₁b₁ − a₂b₂)², elementwise (a's broadcast to r).

    Greedy by magnitude is exact: with L ≥ l the levels ±L ± l are ordered −L−l ≤ −L+l ≤ 0 ≤ L−l ≤ L+l,
    so the sign of the larger term is sign(r) and the smaller one's is the sign of what remains."""
    l1, l2 = a1.abs(), a2.abs()
    first = l1 >= l2
    s_big = sgn(r)
    s_small = sgn(r - s_big * torch.maximum(l1, l2))
    return torch.where(first, s_big, s_small) * sgn(a1), torch.where(first, s_small, s_big) * sgn(a2)


def arb_refine(w: Tensor, m: Tensor, fit: Fit, iters: int) -> Fit:
    """ARB (spec §3), each step the exact minimiser of ‖(w − ŵ)⊙m‖² over one variable:
    μ ← mean(w − Σ α_k b_k); α_k ← mean(b_k (w − μ − Σ_{l≠k} α_l b_l)); b ← nearest levels."""
    order = fit.signs.shape[-3]
    mu, alpha, signs = fit.mu, fit.alpha.clone(), fit.signs.clone()
    for _ in range(iters):
        terms = alpha[..., None] * signs                                     # [..., O, N, C]
        mu = mmean(w - terms.sum(-3), m)
        r = w - mu[..., None]
        for k in range(order):
            others = terms.sum(-3) - terms[..., k, :, :]
            alpha[..., k, :] = mmean(signs[..., k, :, :] * (r - others), m)
            terms[..., k, :, :] = alpha[..., k, :, None] * signs[..., k, :, :]
        if order == 1:
            a = alpha[..., 0, :]
            signs = (sgn(r) * sgn(a)[..., None]).unsqueeze(-3)
        else:
            b1, b2 = _nearest_levels(r, alpha[..., 0, :, None], alpha[..., 1, :, None])
            signs = torch.stack([b1, b2], -3)
    w_hat = ((alpha[..., None] * signs).sum(-3) + mu[..., None]) * m
    return Fit(w_hat, signs, alpha, mu, fit.col)


def arb_order1(w: Tensor, m: Tensor, iters: int) -> Fit:
    return arb_refine(w, m, order1(w, m), iters)


def arb_order2(w: Tensor, m: Tensor, iters: int) -> Fit:
    return arb_refine(w, m, order2(w, m), iters)


def plain_order1(w: Tensor, m: Tensor, iters: int) -> Fit:
    return order1(w, m)


def plain_order2(w: Tensor, m: Tensor, iters: int) -> Fit:
    return order2(w, m)


# ---------------------------------------------------------------- RC form: row × column scales
def _rc_ls(t: Tensor, m: Tensor, b: Tensor, a: Tensor, col: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Alternating least squares for t ≈ a_i c_j b_ij on members, b fixed; `iters` rounds of
    a_i ← Σ_j c_j b_ij t_ij / Σ_j c_j²,  then  c_j ← Σ_i a_i b_ij t_ij / Σ_i a_i²  (member sums)."""
    mf = m.to(t.dtype)
    bt = b * t * mf
    for _ in range(iters):
        a = _div((bt * col[..., None, :]).sum(-1), (mf * col[..., None, :] ** 2).sum(-1))
        col = _div((bt * a[..., None]).sum(-2), (mf * a[..., None] ** 2).sum(-2))
    return a, col


def _rc_init(t: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RC start (spec §3): b = sign(t), a_i = mean_j |t_ij|, c_j = mean_i |t_ij| / a_i."""
    mf = m.to(t.dtype)
    b = sgn(t)
    a = mmean(t.abs(), m)
    live = mf * (a[..., None] > 0)
    col = _div((t.abs() / a[..., None].clamp_min(1e-30) * live).sum(-2), live.sum(-2))
    return b, a, col


def rc_order1(w: Tensor, m: Tensor, iters: int) -> Fit:
    """ARB-RC order 1: ŵ_ij = a_i c_j sign(w_ij); `iters` rounds of alternating least squares."""
    w, m = torch.broadcast_tensors(w, m)
    b, a, col = _rc_init(w, m)
    a, col = _rc_ls(w, m, b, a, col, iters)
    w_hat = a[..., None] * col[..., None, :] * b * m
    zeros = torch.zeros_like(a)
    return Fit(w_hat, b.unsqueeze(-3), a.unsqueeze(-2), zeros, col.unsqueeze(-2))


def rc_order2(w: Tensor, m: Tensor, iters: int) -> Fit:
    """ARB-RC order 2: ŵ = a¹_i c¹_j b¹ + a²_i c²_j b² with b² = sign of the first residual; then
    `iters` rounds: LS update of each term against w minus the other, and signs re-chosen per
    weight among the four levels ±a¹c¹ ± a²c²."""
    w, m = torch.broadcast_tensors(w, m)
    f1 = rc_order1(w, m, 0)
    f2 = rc_order1(w - f1.w_hat, m, 0)
    b1, b2 = f1.signs[..., 0, :, :], f2.signs[..., 0, :, :]
    a1, a2 = f1.alpha[..., 0, :], f2.alpha[..., 0, :]
    c1, c2 = f1.col[..., 0, :], f2.col[..., 0, :]
    for _ in range(iters):
        t2 = a2[..., None] * c2[..., None, :] * b2
        a1, c1 = _rc_ls(w - t2, m, b1, a1, c1, 1)
        t1 = a1[..., None] * c1[..., None, :] * b1
        a2, c2 = _rc_ls(w - t1, m, b2, a2, c2, 1)
        l1 = (a1[..., None] * c1[..., None, :]).abs()
        l2 = (a2[..., None] * c2[..., None, :]).abs()
        s1, s2 = _nearest_levels(w, l1, l2)
        b1 = s1 * sgn(a1[..., None] * c1[..., None, :])
        b2 = s2 * sgn(a2[..., None] * c2[..., None, :])
    w_hat = (a1[..., None] * c1[..., None, :] * b1 + a2[..., None] * c2[..., None, :] * b2) * m
    return Fit(w_hat, torch.stack([b1, b2], -3), torch.stack([a1, a2], -2), torch.zeros_like(a1),
               torch.stack([c1, c2], -2))
