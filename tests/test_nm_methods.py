"""pbs2p and stbllm (arbq.methods.nm): N:M masks against brute force, the fits' invariants and errors on a
fixed synthetic layer, recipe checks, and binarize → pack → load from the bits on a tiny model."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from packing_utils import fit_one_thread

import arbq
from arbq.errors import ArbqError
from arbq.methods import nm as nmm
from arbq.methods.config import BinarizeConfig, load_recipe
from arbq.methods.registry import get_method
from arbq.packed.layouts import dequantize, layout_of
from arbq.packed.nm import nm_counts_ok

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from make_golden import synthetic_problem  # noqa: E402


@pytest.mark.parametrize("n,m,c", [(6, 8, 24), (5, 8, 21), (4, 8, 16), (2, 4, 10), (1, 4, 3)])
def test_nm_mask_keeps_the_top_n_of_every_run(n, m, c):
    """Brute force: in each run of m columns (last run r = c mod m keeps min(n, r)) the kept entries are
    exactly the highest scores."""
    score = torch.randn(5, c, generator=torch.Generator().manual_seed(c))
    keep = nmm.nm_mask(score, n, m)
    for row, g0 in itertools.product(range(5), range(0, c, m)):
        run = score[row, g0:g0 + m]
        want = set(torch.argsort(run, descending=True)[:min(n, len(run))].tolist())
        assert set(torch.nonzero(keep[row, g0:g0 + m]).flatten().tolist()) == want


def test_prune_lowest_removes_one_kept_entry_per_run_each_step():
    score = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(3, 16, dtype=torch.bool)
    for step in range(1, 5):
        keep = nmm.prune_lowest(score, keep, 8, 1)
        assert (keep.reshape(3, 2, 8).sum(-1) == 8 - step).all()
    assert torch.equal(keep, nmm.nm_mask(score, 4, 8))       # with a fixed score, steps = one shot


@pytest.mark.parametrize("quota", [0, 2, 5, 7])
def test_prune_cheapest_runs_prunes_the_cheapest_pending_runs_first(quota):
    """A sub-step, against the obvious loop: in each row, the runs still above kept_after are ranked by their
    cheapest kept score, and the cheapest of them lose that entry until `quota` runs are at kept_after; a run
    already there is never touched; the partial tail run is left alone; quota = all runs = prune_lowest(…, 1)."""
    g = torch.Generator().manual_seed(quota)
    score = torch.randn(4, 7 * 8 + 3, generator=g)
    keep = nmm.prune_lowest(score, torch.ones_like(score, dtype=torch.bool), 8, 1)     # every run keeps 7
    keep[:, :24] = nmm.prune_lowest(score[:, :24], keep[:, :24], 8, 1)               # runs 0-2 keep 6 already
    got = nmm.prune_cheapest_runs(score, keep, 8, 6, quota)
    for r in range(4):
        runs = [(float(score[r, 8 * i:8 * i + 8][keep[r, 8 * i:8 * i + 8]].min()), i) for i in range(3, 7)]
        chosen = {i for _, i in sorted(runs)[:max(quota - 3, 0)]}
        for i in range(7):
            want = keep[r, 8 * i:8 * i + 8].clone()
            if i in chosen:
                lo = torch.where(want, score[r, 8 * i:8 * i + 8], torch.tensor(float("inf"))).argmin()
                want[lo] = False
            assert torch.equal(got[r, 8 * i:8 * i + 8], want), (r, i)
        assert torch.equal(got[r, 56:], keep[r, 56:])
    full = nmm.prune_lowest(score, keep, 8, 1)
    full[:, :24] = keep[:, :24]
    assert torch.equal(nmm.prune_cheapest_runs(score, keep, 8, 6, 7), full)


@pytest.mark.parametrize("steps,sub,runs,want", [
    (2, 1, 16, [(0, 16), (1, 16)]), (2, 2, 16, [(0, 8), (0, 16), (1, 8), (1, 16)]),
    (1, 4, 2, [(0, 1), (0, 2)]), (3, 3, 0, [(2, 0)]), (2, 1, 0, [(0, 0), (1, 0)])])
def test_substep_schedule(steps, sub, runs, want):
    """nm_substeps: sub-step i of step t brings round(R·i/sub) runs of a row to the step's count; sub-steps
    that prune nothing are left out, except the last (it trims a block narrower than M)."""
    assert nmm._schedule(steps, sub, runs) == want


def _obs_reference(w: torch.Tensor, keep: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The slow, obvious form of sequential OBS for one row (float64): fix the columns left to right; when
    column j is fixed at q_j (0 if pruned, else its current value), the columns F not yet fixed move by
    δ_F = −(w_j − q_j) [H_F⁻¹]_{F,j} / [H_F⁻¹]_jj, with H_F⁻¹ the inverse of H on {j} ∪ F, recomputed."""
    w, H = w.double().clone(), H.double()
    for j in range(len(w)):
        F = list(range(j, len(w)))
        Hi = torch.linalg.inv(H[F][:, F])
        q = w[j] * keep[j]
        w[F] -= (w[j] - q) / Hi[0, 0] * Hi[:, 0]
        w[j] = q
    return w


@pytest.mark.parametrize("n,m,C,earlier", [(6, 8, 12, False), (4, 8, 44, True), (2, 4, 16, True), (7, 8, 8, False)])
def test_compensate_pruned_is_sequential_obs(n, m, C, earlier):
    """compensate_pruned (Cholesky rows, all rows at once) equals the obvious per-row OBS with re-inverted
    Hessians, also when some pruned entries are already 0 from an earlier step and
    rows prune different counts (a partial last run); the errors it owes are the GPTQ form of the same updates."""
    g = torch.Generator().manual_seed(3)
    N = 5
    X = torch.randn(64, C, generator=g, dtype=torch.float64) @ torch.randn(C, C, generator=g, dtype=torch.float64)
    H = X.T @ X / 64 + 0.01 * torch.eye(C, dtype=torch.float64)
    W = torch.randn(N, C, generator=g, dtype=torch.float64)
    score = torch.randn(N, C, generator=g)
    keep = nmm.nm_mask(score, n, m)
    if earlier:                                   # an earlier step's pruned entries are 0 already
        W = W * nmm.nm_mask(score, n + 1, m)
    if C % m:                                     # rows prune different counts in the partial last run
        keep[0, -1] = keep[1, -1] = False
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    got, E = nmm.compensate_pruned(W, keep, U)
    for r in range(N):
        torch.testing.assert_close(got[r], _obs_reference(W[r], keep[r], H), rtol=1e-9, atol=1e-9)
    assert (got[~keep] == 0).all()
    # the owed errors are the GPTQ form of the same updates: W' = keep ∘ (W − E·strict_upper(U))
    torch.testing.assert_close(got, (W - E @ torch.triu(U, 1)) * keep, rtol=1e-9, atol=1e-9)
    assert (E[keep] == 0).all()


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem()


def _fit(problem, method: str, **kw):
    res, row, cfg = fit_one_thread(*problem, method=method, blocksize=64, **kw)
    return (res, row), cfg


def _shipped_fit(problem, recipe: str, nm: str):
    """The fit with a shipped recipe's keys (recipes/NAME.yaml) at N:M `nm`, blocksize 64 as every fit here."""
    cfg = load_recipe(recipe)
    keys = {k: v for k, v in cfg.to_dict().items() if k in nmm.NM_KEYS and k not in ("blocksize", "nm")}
    return _fit(problem, cfg.method, nm=nm, **keys)


@pytest.mark.parametrize("key,value", [("nm_reprune", 1), ("nm_compensate", True), ("nm_substeps", 2),
                                       ("nm_masks", "pruned")])
def test_stbllm_refuses_the_stepwise_keys(key, value):
    """stbllm prunes once before binarizing: a key that acts on pbs2p's steps is refused, not silently ignored."""
    with pytest.raises(ArbqError, match=key):
        BinarizeConfig(method="stbllm", **{key: value}).checked()
    BinarizeConfig(method="pbs2p", **{key: value}).checked()


def _assert_n_of_m_and_packs_exactly(res, cfg, method: str, nm: str) -> None:
    """Exactly N of every M weights kept, and the packed layer dequantizes to the fit."""
    n, m = map(int, nm.split(":"))
    assert (res.keep.reshape(res.keep.shape[0], -1, m).sum(-1) == n).all()
    rec = get_method(method)
    assert torch.equal(dequantize(layout_of(rec.layout).pack(res, rec.layout_params(cfg), "fp16")),
                       res.dequantize())


@pytest.mark.parametrize("method", ["pbs2p", "stbllm"])
@pytest.mark.parametrize("nm", ["6:8", "4:8", "2:4"])
def test_fit_is_n_of_m_and_packs_exactly(problem, method, nm):
    (res, row), cfg = _fit(problem, method, nm=nm, cgb=True)
    n, m = map(int, nm.split(":"))
    _assert_n_of_m_and_packs_exactly(res, cfg, method, nm)
    assert (res.dequantize()[~res.keep] == 0).all() and row["kept_frac"] == pytest.approx(n / m)


def test_stepwise_pruning_beats_prune_then_binarize(problem):
    """The fixed synthetic layer (1 thread, exact compensation): pbs2p's output error is below stbllm's at every
    N:M, the shipped pbs2p recipe's settings (re-pruning, regroup 2, masks on the pruned block) are the lowest at
    every N:M and below 0.7 × the shipped stbllm recipe's, and at 6:8 pbs2p is below the
    dense binarization; the values are pinned within 5%. (Without re-pruning, the one-shot-per-block ablation is
    below the stepwise fit at 5:8 and 4:8 with this compensation: 0.0305 vs 0.0323, 0.0396 vs 0.0431; it was
    above it with the diagonal one.)"""
    err = {}
    for nm in ("6:8", "5:8", "4:8"):
        err["pbs2p", nm] = _fit(problem, "pbs2p", nm=nm, cgb=True)[0][1]["output_err"]
        err["stbllm", nm] = _fit(problem, "stbllm", nm=nm, cgb=True)[0][1]["output_err"]
        err["once", nm] = _fit(problem, "pbs2p", nm=nm, cgb=True, nm_stepwise=False)[0][1]["output_err"]
        recipe = _shipped_fit(problem, "pbs2p", nm)[0][1]["output_err"]
        stbllm_recipe = _shipped_fit(problem, "stbllm", nm)[0][1]["output_err"]
        assert err["pbs2p", nm] < err["stbllm", nm] and err["once", nm] < err["stbllm", nm]
        assert recipe < min(err["pbs2p", nm], err["once", nm]) and recipe < 0.7 * stbllm_recipe
    assert err["pbs2p", "6:8"] < err["once", "6:8"]
    dense = _fit(problem, "rc", cgb=True)[0][1]["output_err"]
    assert err["pbs2p", "6:8"] < dense           # pruning 25% with re-fitting beats the dense binarization
    for key, want in PINNED.items():
        assert err[key] == pytest.approx(want, rel=0.05), key


# measured (1 thread, exact compensation); dense rc+cgb on the same layer: 0.0334565 (pbs2p 6:8 is below it, as
# the paper claims); the shipped recipes (polish 3, percdamp 0.1 since session 21): pbs2p 0.0147 / 0.0168 / 0.0246
# vs stbllm 0.0236 / 0.0323 / 0.0473 (before: 0.0178 / 0.0224 / 0.0311 vs 0.0328 / 0.0380 / 0.0523)
PINNED = {("pbs2p", "6:8"): 0.0246514, ("stbllm", "6:8"): 0.0397050, ("pbs2p", "5:8"): 0.0323262,
          ("stbllm", "5:8"): 0.0444628, ("pbs2p", "4:8"): 0.0431089, ("stbllm", "4:8"): 0.0639833}


def test_in_block_compensation_lowers_the_pruning_error_where_more_is_pruned(problem):
    """nm_compensate (OBS updates of what each step prunes onto the block's later survivors) on the fixed
    synthetic layer, pinned within 5%: with the exact block compensation it lowers pbs2p's output error at 5:8
    and 4:8 (0.824× / 0.825× of the uncompensated fit) and raises it at 6:8 (1.098×); with the diagonal one it
    lowered it at all three (0.954× / 0.931× / 0.884×)."""
    for nm, want in COMPENSATED.items():
        (res, row), _ = _fit(problem, "pbs2p", nm=nm, cgb=True, nm_compensate=True)
        n, m = map(int, nm.split(":"))
        assert (res.keep.reshape(res.keep.shape[0], -1, m).sum(-1) == n).all()
        assert (row["output_err"] < PINNED["pbs2p", nm]) == (nm != "6:8")
        assert row["output_err"] == pytest.approx(want, rel=0.05), nm


COMPENSATED = {"6:8": 0.0270614, "5:8": 0.0266294, "4:8": 0.0355671}


def _brute_force_positions(W, fit, c, n, m, cgb):
    """For every row and run of m: the subset of n kept entries, and each kept entry's group, minimising
    Σ c_j (w_j − q_j)² with q = 0 at pruned entries and, at kept ones, the nearest of the group's levels
    μ_g + s·l (+ s'·l₂ at salient columns), enumerated over every sign choice — no shared code with arbq."""
    N, C = W.shape
    keep = torch.zeros(N, C, dtype=torch.bool)
    group = fit.group.clone()
    levels = []                                    # [group][N, C, choices] of every representable value
    for g in (0, 1):
        sal = fit.salient[None, :]
        l1 = (fit.alpha[:, 0, g, 0, None] * fit.col_scale[g, 0][None, :]).abs()
        one = torch.stack([fit.mu[:, 0, g, None] + s * l1 for s in (-1, 1)], -1)
        k1 = (fit.alpha[:, 1, g, 0, None] * fit.col_scale[g, 0][None, :]).abs()
        k2 = (fit.alpha[:, 1, g, 1, None] * fit.col_scale[g, 1][None, :]).abs()
        two = torch.stack([fit.mu[:, 1, g, None] + s * k1 + t * k2 for s in (-1, 1) for t in (-1, 1)], -1)
        levels.append(torch.where(sal[..., None], two, torch.cat([one, one], -1)))
    for r in range(N):
        for g0 in range(0, C, m):
            cols = range(g0, g0 + m)
            cost = {}
            for j in cols:
                free = cgb or not bool(fit.salient[j])
                opts = (0, 1) if free else (int(fit.group[r, j]),)
                cost[j] = min((float(((W[r, j] - levels[g][r, j]) ** 2).min() * c[0, j]), g) for g in opts)
            best = min(itertools.combinations(cols, n),
                       key=lambda ks: sum(cost[j][0] for j in ks) + sum(float(W[r, j] ** 2 * c[0, j])
                                                                       for j in cols if j not in ks))
            for j in best:
                keep[r, j] = True
                group[r, j] = bool(cost[j][1])
    return keep, group


@pytest.mark.parametrize("nm,cgb", [("6:8", True), ("4:8", True), ("5:8", False)])
def test_best_positions_minimise_each_runs_error(problem, nm, cgb):
    """best_positions (the re-pruning step) against a brute force over every C(M, N) subset of every run and
    every sign and group choice of the kept weights, for a fitted block's levels."""
    from arbq.methods.binary import STRATEGIES
    from arbq.methods.block import choose_masks, fit_block

    W, H = problem
    Wb, S = W[:12, :32], H[:32, :32]
    n, m = map(int, nm.split(":"))
    cfg = BinarizeConfig(method="pbs2p", nm=nm, cgb=cgb).checked()
    d = torch.rand(32, generator=torch.Generator().manual_seed(2)) + 0.5
    salient, group = choose_masks(Wb, d, S, STRATEGIES["rc"], cfg)
    fit = fit_block(Wb, salient, group, S, STRATEGIES["rc"], cfg, nmm.nm_mask(Wb.abs(), n, m))
    c = 1.0 / (d * d)[None, :]
    keep, grp = nmm.best_positions(Wb, fit, c, n, m, cgb)
    want_keep, want_group = _brute_force_positions(Wb, fit, c, n, m, cgb)
    assert torch.equal(keep, want_keep)
    assert torch.equal(grp[keep], want_group[keep]) and torch.equal(grp[~keep], fit.group[~keep])


def test_repruning_lowers_the_error_and_keeps_n_of_m(problem):
    """nm_reprune (one Lloyd round over the N:M positions after the last step, quick fits between the steps,
    regroup 2 as in the recipe) on the fixed synthetic layer: exactly N of every M kept, packs exactly, output
    error pinned within 3% and below the same recipe without it (measured 0.838× / 0.901× / 0.948× at
    6:8 / 5:8 / 4:8 with the exact block compensation; 0.933× / 0.988× / 0.975× with the diagonal one)."""
    for nm, (without, want) in REPRUNED.items():
        (res, row), cfg = _fit(problem, "pbs2p", nm=nm, cgb=True, regroup=2, nm_reprune=1)
        base = _fit(problem, "pbs2p", nm=nm, cgb=True, regroup=2)[0][1]["output_err"]
        _assert_n_of_m_and_packs_exactly(res, cfg, "pbs2p", nm)
        assert base == pytest.approx(without, rel=0.03), nm
        assert row["output_err"] == pytest.approx(want, rel=0.03), nm
        assert row["output_err"] < base * {"6:8": 0.87, "5:8": 0.93, "4:8": 0.975}[nm]


REPRUNED = {"6:8": (0.0207112, 0.0173482), "5:8": (0.0246908, 0.0222474), "4:8": (0.0339033, 0.0321572)}


def test_substeps_keep_n_of_m_and_pin_the_error(problem):
    """nm_substeps 2 (each step in two sub-masks, regroup 2) on the fixed synthetic layer: exactly N of every M
    kept, packs exactly, output error pinned within 3% (measured 1.029× / 0.963× / 1.007× of one sub-mask per
    step at 6:8 / 5:8 / 4:8: the sub-mask split is neutral here, and off in the recipe)."""
    for nm, want in SUBSTEPS.items():
        (res, row), cfg = _fit(problem, "pbs2p", nm=nm, cgb=True, regroup=2, nm_substeps=2)
        _assert_n_of_m_and_packs_exactly(res, cfg, "pbs2p", nm)
        assert row["output_err"] == pytest.approx(want, rel=0.03), nm


SUBSTEPS = {"6:8": 0.0213140, "5:8": 0.0237859, "4:8": 0.0341379}


def test_masks_chosen_on_the_pruned_block(problem):
    """nm_masks "pruned" (salient columns and group split chosen on the block with its one-shot N:M mask zeroed,
    the recipe's other settings) on the fixed synthetic layer: exactly N of every M kept, packs exactly, and the
    output error is pinned within 3% (measured 1.027× / 1.008× / 0.967× of masks chosen on the dense block at
    6:8 / 5:8 / 4:8: the dense masks fail the 4:8 pin)."""
    for nm, want in MASKS_PRUNED.items():
        (res, row), cfg = _fit(problem, "pbs2p", nm=nm, cgb=True, regroup=2, nm_reprune=1, nm_masks="pruned")
        _assert_n_of_m_and_packs_exactly(res, cfg, "pbs2p", nm)
        assert row["output_err"] == pytest.approx(want, rel=0.03), nm


MASKS_PRUNED = {"6:8": 0.0178216, "5:8": 0.0224338, "4:8": 0.0310922}


def _recipe_keys(method: str) -> dict:
    """The shipped recipes' fitting keys, spelled out (so the pins below do not follow a recipe change), without
    nm_act_order."""
    return {"cgb": True, "regroup": 2} | ({"nm_reprune": 1, "nm_masks": "pruned"} if method == "pbs2p" else {})


def _runs_by_hessian(H: torch.Tensor, m: int) -> list[int]:
    """The obvious loop: full runs of m columns sorted by Σ_run H_jj, largest first, ties left first."""
    d = torch.diag(H).tolist()
    runs = [(sum(d[r * m:(r + 1) * m]), r) for r in range(len(d) // m)]
    return [r for _, r in sorted(runs, key=lambda t: (-t[0], t[1]))]


@pytest.mark.parametrize("method", ["pbs2p", "stbllm"])
@pytest.mark.parametrize("nm", ["6:8", "2:4"])
def test_act_order_is_the_fit_of_the_reordered_problem(problem, method, nm):
    """nm_act_order: the fit equals the plain fit of W[:, π], H[π, π] with π the runs of M by decreasing Σ H_jj
    (whole runs, so N:M holds), stored in that order with the run order, and Ŵ comes back in the model's order
    (also after packing)."""
    W, H = problem
    m = int(nm.split(":")[1])
    K = W.shape[1] - 5                                      # a partial last run: it stays last
    W, H = W[:, :K], H[:K, :K]
    runs = _runs_by_hessian(H, m)
    cols = torch.tensor([r * m + j for r in runs for j in range(m)] + list(range(len(runs) * m, K)))
    keys = _recipe_keys(method)
    (res, row), cfg = _fit((W, H), method, nm=nm, nm_act_order=True, **keys)
    (ref, ref_row), _ = _fit((W[:, cols].contiguous(), H[cols][:, cols].contiguous()), method, nm=nm, **keys)
    assert res.order.tolist() == runs and ref.order is None
    assert torch.equal(res.keep, ref.keep) and torch.equal(res.base.dequantize(), ref.base.dequantize())
    assert torch.equal(res.dequantize()[:, cols], ref.dequantize())
    assert row["output_err"] == pytest.approx(ref_row["output_err"], rel=1e-5)
    assert nm_counts_ok(res.keep, int(nm.split(":")[0]), m)
    rec = get_method(method)
    assert torch.equal(dequantize(layout_of(rec.layout).pack(res, rec.layout_params(cfg), "fp16")), res.dequantize())


def test_act_order_pins_the_error_on_a_layer_with_uneven_inputs(problem):
    """nm_act_order with the pbs2p and stbllm recipes' keys on the synthetic layer with its input scales spread
    (H ← D H D, D = exp(N(0, 1)) per column, as real activations' channels differ): output error pinned within 3%
    and below left to right (measured 0.757× / 0.817× for pbs2p at 6:8 / 4:8, 0.852× / 0.933× for stbllm). On
    the unspread layer it is neutral (0.97–1.03×); on 12 linears of the fixture model pbs2p 6:8 0.946×."""
    W, H = problem
    D = torch.exp(torch.randn(W.shape[1], generator=torch.Generator().manual_seed(7)))
    spread = (W, D[:, None] * H * D[None, :])
    for (method, nm), (plain, ordered) in ACT_ORDER.items():
        keys = _recipe_keys(method)
        (res, row), cfg = _fit(spread, method, nm=nm, nm_act_order=True, **keys)
        base = _fit(spread, method, nm=nm, **keys)[0][1]["output_err"]
        assert base == pytest.approx(plain, rel=0.03), (method, nm)
        assert row["output_err"] == pytest.approx(ordered, rel=0.03), (method, nm)
        assert row["output_err"] < base * 0.95, (method, nm)


ACT_ORDER = {("pbs2p", "6:8"): (0.0150966, 0.0114282), ("pbs2p", "4:8"): (0.0186840, 0.0152707),
             ("stbllm", "6:8"): (0.0276907, 0.0236045), ("stbllm", "4:8"): (0.0352726, 0.0329000)}


@pytest.mark.parametrize("bad,msg", [({"nm": "8:8"}, "nm"), ({"nm": "six:8"}, "nm"), ({"nm_metric": "l2"}, "nm_metric"),
                                     ({"nm_base": "sign"}, "nm_base"), ({"nm_stepwise": "yes"}, "nm_stepwise"),
                                     ({"nm_compensate": 1}, "nm_compensate"), ({"nm_reprune": -1}, "nm_reprune"),
                                     ({"nm_substeps": 0}, "nm_substeps"), ({"nm": "5:6"}, "multiple of M"),
                                     ({"nm_masks": "sparse"}, "nm_masks"), ({"nm_act_order": "yes"}, "nm_act_order")])
def test_bad_nm_recipes_are_refused(bad, msg):
    with pytest.raises(ArbqError, match=msg):
        BinarizeConfig(method="pbs2p", **bad).checked()


@pytest.mark.parametrize("method,ordered", [("pbs2p", False), ("stbllm", False), ("pbs2p", True)])
def test_binarize_pack_load_runs_from_the_bits(method, ordered, tiny_llama_dir, botchan, tmp_path, arbq_cli,
                                               monkeypatch):
    """`arbq binarize --method pbs2p|stbllm` end to end on a tiny model: the packed dir gives the fake-quant
    logits (torch backend) and its size report counts the N:M positions (and, with nm_act_order from a recipe,
    the run order: 16 bits per run of 8 columns)."""
    import json

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ARBQ_KERNEL", "torch")
    run, packed, recipe = tmp_path / "run", tmp_path / "packed", tmp_path / "ordered.yaml"
    recipe.write_text(json.dumps({"binarize": {"method": method, "nm": "6:8", "cgb": True, "nm_act_order": True}}))
    how = ["--recipe", recipe] if ordered else ["--method", method, "--cgb"]
    r = arbq_cli("binarize", tiny_llama_dir, "-o", run, *how, "--data", botchan, "--nsamples", "4", "--seqlen", "32")
    assert r.returncode == 0, r.stderr
    r = arbq_cli("pack", run, "-o", packed, "--dtype", "fp32", "--json", tmp_path / "size.json")
    assert r.returncode == 0, r.stderr
    size = json.loads((tmp_path / "size.json").read_text())
    bits = size["binarized"]
    assert bits["measured_equals_formula"] and bits["bpw_measured"]["nm_positions"] == 1.0
    order_bits = sum(16 * (lin["in_features"] // 8) for lin in size["linears"]) if ordered else 0
    assert bits["bpw_measured"].get("run_order", 0) == pytest.approx(order_bits / bits["weights"])
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = arbq.load(packed)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(run / "model-fake")(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
