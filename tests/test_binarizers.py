"""Group binarizers against closed forms, brute-force least squares and monotonicity."""

import pytest
import torch

from arbq.methods import binarizers as bz
from arbq.methods.xrefine import x_refine


def heavy(n=24, c=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.StudentT(3.0).sample((n, c)).double()
    return w + 0.1 * torch.randn(n, c, generator=g, dtype=torch.float64)


def err(w, fit, m):
    return float(((w - fit.w_hat) * m).pow(2).sum())


def test_order1_matches_definition():
    w = heavy()
    m = torch.rand(w.shape) > 0.3
    f = bz.order1(w, m)
    for r in range(w.shape[0]):
        v = w[r][m[r]]
        mu = v.mean()
        alpha = (v - mu).abs().mean()
        want = alpha * torch.where(v - mu >= 0, 1.0, -1.0).double() + mu
        torch.testing.assert_close(f.w_hat[r][m[r]], want)
        assert float(f.w_hat[r][~m[r]].abs().sum()) == 0.0


@pytest.mark.parametrize("fit", [bz.arb_order1, bz.arb_order2, bz.rc_order1, bz.rc_order2],
                         ids=["arb1", "arb2", "rc1", "rc2"])
def test_refinement_never_rises_and_beats_one_shot(fit):
    w, m = heavy(seed=1), torch.rand(24, 40) > 0.2
    errs = [err(w, fit(w, m, t), m) for t in range(16)]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < errs[0] * 0.999


def test_arb_step_equals_least_squares():
    """One ARB iteration: μ, then α, each the brute-force least-squares solution of its sub-problem."""
    w = heavy(6, 9, seed=3)
    m = torch.ones_like(w, dtype=torch.bool)
    f0 = bz.order1(w, m)
    f1 = bz.arb_refine(w, m, f0, 1)
    b0 = f0.signs[0]
    for r in range(w.shape[0]):
        ones = torch.ones(w.shape[1], 1, dtype=w.dtype)
        mu = torch.linalg.lstsq(ones, (w[r] - f0.alpha[0, r] * b0[r])[:, None]).solution.squeeze()
        torch.testing.assert_close(f1.mu[r], mu)
        alpha = torch.linalg.lstsq(b0[r][:, None], (w[r] - mu)[:, None]).solution.squeeze()
        torch.testing.assert_close(f1.alpha[0, r], alpha.abs())


def test_rc_step_equals_least_squares():
    """One RC round: a_i then c_j, each the brute-force least-squares solution given the other."""
    w = heavy(5, 7, seed=4)
    m = torch.rand(w.shape) > 0.25
    b, a0, c0 = bz._rc_init(w, m)
    a1, c1 = bz._rc_ls(w, m, b, a0, c0, 1)
    for i in range(w.shape[0]):
        cols = m[i]
        A = (c0[cols] * b[i, cols])[:, None]
        want = torch.linalg.lstsq(A, w[i, cols][:, None]).solution.squeeze()
        torch.testing.assert_close(a1[i], want)
    for j in range(w.shape[1]):
        rows = m[:, j]
        A = (a1[rows] * b[rows, j])[:, None]
        want = torch.linalg.lstsq(A, w[rows, j][:, None]).solution.squeeze()
        torch.testing.assert_close(c1[j], want)


def test_x_refine_never_raises_output_error():
    g = torch.Generator().manual_seed(5)
    w = heavy(16, 32, seed=5)
    X = torch.randn(200, 32, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    S = X.T @ X
    sal = torch.zeros(16, 32, dtype=torch.bool)
    sal[:, :4] = True
    groups = [(sal, bz.arb_order2(w, sal, 15)), (~sal, bz.arb_order1(w, ~sal, 15))]

    def out_err(fits):
        R = w - sum(f.w_hat for f in fits)
        return float(((R @ S) * R).sum())

    errs = [out_err(x_refine(w, S, groups, t, mean_form=True)) for t in range(8)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 0.99 * errs[0]
    # the X objective's optimum of μ for one group alone is Σ S (w − αb) / Σ S (spec §3)
    m = torch.ones(1, 32, dtype=torch.bool)
    f = bz.order1(w[:1], m)
    r = x_refine(w[:1], S, [(m, f)], 1, mean_form=True)[0]
    t = (w[0] - f.alpha[0, 0] * f.signs[0, 0])
    torch.testing.assert_close(r.mu[0], (S @ t).sum() / S.sum())


def test_empty_group_is_zero():
    w = heavy()
    m = torch.zeros_like(w, dtype=torch.bool)
    for fit in (bz.arb_order1, bz.arb_order2, bz.rc_order1, bz.rc_order2):
        f = fit(w, m, 3)
        assert torch.isfinite(f.w_hat).all() and float(f.w_hat.abs().max()) == 0.0


def test_nearest_levels_is_the_best_of_four():
    g = torch.Generator().manual_seed(7)
    r = torch.randn(500, generator=g, dtype=torch.float64)
    a1 = torch.randn(500, generator=g, dtype=torch.float64)
    a2 = torch.randn(500, generator=g, dtype=torch.float64)
    b1, b2 = bz._nearest_levels(r, a1, a2)
    got = (r - a1 * b1 - a2 * b2).abs()
    best = torch.stack([(r - s1 * a1 - s2 * a2).abs() for s1 in (1, -1) for s2 in (1, -1)]).min(0).values
    torch.testing.assert_close(got, best)
