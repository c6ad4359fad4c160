"""Mask search: closed-form scorers equal brute force; masks partition every block."""

import pytest
import torch

from arbq.methods import binarizers as bz
from arbq.methods import fastsearch as fs
from arbq.methods import masks as mk
from arbq.methods.block import choose_masks, fit_block
from arbq.methods.config import BinarizeConfig
from arbq.methods.registry import METHODS


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


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("cgb", [False, True])
def test_block_groups_partition_and_salient_bits(method, cgb):
    w = heavy(32, 64, seed=3).float()
    S = torch.eye(64) + 0.1
    cfg = BinarizeConfig(method=method, cgb=cgb, iters=3, x_iters=3)
    salient, group = choose_masks(w, torch.ones(64), S, METHODS[method], cfg)
    fit = fit_block(w, salient, group, S, METHODS[method], cfg)
    sal = salient[None, :].expand_as(w)
    kinds = [(~sal & ~group), (~sal & group), (sal & ~group), (sal & group)]
    assert torch.equal(sum(k.int() for k in kinds), torch.ones_like(w, dtype=torch.int32))
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
