"""Mask search: closed-form scorers equal brute force; masks partition every block."""

import pytest
import torch

from arbq.methods import binarizers as bz
from arbq.methods import fastsearch as fs
from arbq.methods import masks as mk
from arbq.methods.binary import STRATEGIES as METHODS
from arbq.methods.block import choose_masks, fit_block
from arbq.methods.config import RECIPES_DIR, BinarizeConfig, load_recipe


def heavy(n, c, seed=0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n, c)).double()


@pytest.mark.parametrize("order", [1, 2])
def test_split_errors_equal_brute_force(order):
    w = heavy(19, 33)
    ps = mk.quantile_thresholds(w.abs().flatten(), 11)
    fit = bz.order1 if order == 1 else bz.order2
    slow = []
    for p in ps:
        big = w.abs() >= p
        R = w - fit(w, big).w_hat - fit(w, ~big).w_hat
        slow.append(float((R * R).sum()))
    torch.testing.assert_close(fs.split_errors(w, ps, order), torch.tensor(slow, dtype=torch.float64))


@pytest.mark.parametrize("order", [1, 2])
def test_masked_errors_equal_brute_force(order):
    w = heavy(9, 14, seed=1)
    m = (torch.rand(6, 9, 14) > 0.4).double()
    fit = bz.order1 if order == 1 else bz.order2
    slow = torch.stack([((w - fit(w, m[k].bool()).w_hat) * m[k]).pow(2).sum() for k in range(6)])
    torch.testing.assert_close(fs.masked_errors(w, m, order), slow)


def test_plain_and_fit_scorers_agree_for_billm():
    """The closed-form scorer picks the same masks as running BiLLM's binarizers on each candidate."""
    w = heavy(24, 64, seed=2).float()
    cfg = BinarizeConfig(method="billm", cgb=True)
    plain = choose_masks(w, None, None, METHODS["billm"], cfg)
    fitted = choose_masks(w, None, None, METHODS["billm"], cfg.replace(search_fit="method"))
    assert torch.equal(plain[0], fitted[0])
    assert (plain[1] != fitted[1]).float().mean() < 0.01


def _rebuild(fit):
    """Ŵ of one block from its stored bits and scales, each weight from its own (kind, group) only
    (the LinearResult.dequantize equation)."""
    n, c = fit.sign1.shape
    rows, cols = torch.arange(n)[:, None], torch.arange(c)[None, :]
    kind, g = fit.salient.long()[None, :].expand(n, c), fit.group.long()
    s1, s2 = fit.sign1.float() * 2 - 1, fit.sign2.float() * 2 - 1
    first = fit.alpha[rows, kind, g, 0] * fit.col_scale[g, 0, cols] * s1
    second = fit.alpha[rows, kind, g, 1] * fit.col_scale[g, 1, cols] * s2
    return fit.mu[rows, kind, g] + first + kind * second


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("cgb", [False, True])
def test_block_groups_partition_and_salient_bits(method, cgb):
    w = heavy(32, 64, seed=3).float()
    S = torch.eye(64) + 0.1
    cfg = BinarizeConfig(method=method, cgb=cgb, iters=3, x_iters=3)
    salient, group = choose_masks(w, torch.ones(64), S, METHODS[method], cfg)
    fit = fit_block(w, salient, group, S, METHODS[method], cfg)
    sal = salient[None, :].expand_as(w)
    # partition: every weight is rebuilt from the signs and scales of exactly its own (kind, group) —
    # fit.w_hat sums the groups' fits, so an overlap would count a weight twice and a gap leave it 0
    assert torch.allclose(_rebuild(fit), fit.w_hat, rtol=1e-5, atol=1e-6)
    assert (fit.w_hat != 0).all()
    if METHODS[method].search:
        assert 1 <= int(salient.sum()) <= 49
        assert (sal & group).any() == cgb      # CGB: salient columns are split too
        # salient weights carry a second, non-zero residual scale
        assert float(fit.alpha[:, 1, :, 1].abs().max()) > 0
        assert float(fit.alpha[:, 0, :, 1].abs().max()) == 0
    else:
        assert not salient.any() and not group.any()
    assert torch.isfinite(fit.w_hat).all()


@pytest.mark.parametrize("order", [1, 2])
def test_prefix_set_errors_equal_masked_errors(order):
    """The 2-D prefix-table scorer of nested column sets equals the direct masked computation."""
    w = heavy(37, 40, seed=4)
    rank = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    ks = torch.arange(1, 30)
    m = (rank[None, :] < ks[:, None])[:, None, :].double().expand(-1, 37, 40)
    slow = fs.masked_errors(w, m, order) + fs.masked_errors(w, 1 - m, order)
    torch.testing.assert_close(fs.prefix_set_errors(w, rank, ks, order, rows_per_chunk=16), slow)


def _reference_search(T, cgb, up_lim=50, points=81):
    """The reference code's mask search written the slow, obvious way: loops over salient counts and
    thresholds, BiLLM's plain binarizers on explicit masks, weight error on the search matrix T."""
    N, C = T.shape
    err = lambda R: float((R * R).sum())  # noqa: E731
    top = torch.argsort(T.abs().sum(0), descending=True, stable=True)
    best_k, best = None, float("inf")
    for k in range(1, min(up_lim, C)):
        sal = torch.zeros(N, C, dtype=torch.bool)
        sal[:, top[:k]] = True
        e = err(T - bz.order2(T, sal).w_hat - bz.order2(T, ~sal).w_hat)
        if e < best:
            best_k, best = k, e
    sal = torch.zeros(N, C, dtype=torch.bool)
    sal[:, top[:best_k]] = True
    q = torch.linspace(0.1, 0.9, points, dtype=T.dtype)

    def split(member, order, thresholds):
        fit = bz.order2 if order == 2 else bz.order1
        best_p, best_e = None, float("inf")
        for p in thresholds:
            big = (T.abs() >= p) & member
            e = err((T - fit(T, big).w_hat - fit(T, member & ~big).w_hat) * member)
            if e < best_e:
                best_p, best_e = p, e
        return (T.abs() >= best_p) & member

    group = split(~sal, 1, torch.quantile((T * ~sal).abs().flatten(), q))    # zeros included
    if cgb:
        group |= split(sal, 2, torch.quantile(T[sal].abs(), q))
    return sal[0], group


@pytest.mark.parametrize("cgb", [False, True])
@pytest.mark.parametrize("metric", ["hessian", "magnitude"])
def test_reference_recipe_reproduces_the_reference_search(cgb, metric):
    """search_on=salience + split_quantiles=with_zeros (recipes/reference-*.yaml) choose the masks of the
    reference code's loops: search on T = W (magnitude) or W²/d² (hessian), plain binarizers."""
    w = heavy(40, 64, seed=7)
    d = torch.rand(64, dtype=torch.float64) + 0.2
    cfg = BinarizeConfig(method="rc", cgb=cgb, salient=metric, search_on="salience", split_quantiles="with_zeros")
    salient, group = choose_masks(w, d, None, METHODS["rc"], cfg)
    ref_sal, ref_group = _reference_search(mk.salience_matrix(w, d, metric), cgb)
    assert torch.equal(salient, ref_sal)
    assert torch.equal(group, ref_group)


def test_search_on_weight_differs_from_salience_search():
    """The arbq default searches on W; with the hessian metric that gives other masks than the reference."""
    w = heavy(40, 64, seed=8)
    d = torch.rand(64, dtype=torch.float64) + 0.2
    cfg = BinarizeConfig(method="rc", cgb=True, salient="hessian")
    ours = choose_masks(w, d, None, METHODS["rc"], cfg)
    ref = choose_masks(w, d, None, METHODS["rc"], cfg.replace(search_on="salience", split_quantiles="with_zeros"))
    assert not torch.equal(ours[1], ref[1])
    # arbq's non-salient groups are a threshold split of |W| itself: every large weight is in the group
    ns = ~ours[0][None, :].expand_as(w)
    inside, outside = w.abs()[ns & ours[1]], w.abs()[ns & ~ours[1]]
    assert inside.min() >= outside.max()


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_loads_and_reference_recipes_are_faithful(name):
    """Each recipe is a valid config; the reference-equivalents hold the reference code's choices."""
    cfg = load_recipe(name)
    if name.startswith("reference-"):
        assert (cfg.search_fit, cfg.search_on, cfg.split_quantiles, cfg.true_sequential) == \
            ("plain", "salience", "with_zeros", False)
        assert cfg.salient == ("hessian" if name.endswith("-hessian") else "magnitude")
        assert cfg.split_error == ("output" if cfg.method == "x" else "weight")
        assert cfg.regroup == 0                  # the reference's threshold split, no Lloyd rounds
