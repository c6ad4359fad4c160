"""Group reassignment (`regroup`, arbq.methods.block): Lloyd steps on BiLLM's two-group magnitude split."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from packing_utils import fit_one_thread

from arbq.errors import ArbqError
from arbq.methods.block import BlockFit, group_candidates, regroup
from arbq.methods.config import BinarizeConfig
from arbq.methods.registry import get_method
from arbq.packed.layouts import dequantize, layout_of

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from make_golden import synthetic_problem  # noqa: E402


def _random_fit(N: int = 5, C: int = 12, seed: int = 0) -> tuple[torch.Tensor, BlockFit]:
    g = torch.Generator().manual_seed(seed)
    salient = torch.rand(C, generator=g) < 0.3
    fit = BlockFit(w_hat=torch.zeros(N, C), sign1=torch.ones(N, C, dtype=torch.bool),
                   sign2=torch.zeros(N, C, dtype=torch.bool), group=torch.rand(N, C, generator=g) < 0.5,
                   salient=salient, alpha=torch.randn(N, 2, 2, 2, generator=g),
                   mu=torch.randn(N, 2, 2, generator=g) * 0.1,
                   col_scale=torch.rand(2, 2, C, generator=g) + 0.5)
    return torch.randn(N, C, generator=g), fit


def _slow_best(w: float, mu: float, levels: list[float]) -> float:
    """The representable value nearest w among μ + Σ_k s_k·levels_k, every sign combination tried."""
    vals = [mu + sum(s * lv for s, lv in zip(signs, levels, strict=True))
            for signs in itertools.product((-1.0, 1.0), repeat=len(levels))]
    return min(vals, key=lambda v: (w - v) ** 2)


def test_group_candidates_equal_a_brute_force_over_signs():
    W, fit = _random_fit()
    cand = group_candidates(W, fit)
    N, C = W.shape
    for g, i, j in itertools.product(range(2), range(N), range(C)):
        kind = int(fit.salient[j])
        levels = [abs(float(fit.alpha[i, kind, g, o] * fit.col_scale[g, o, j])) for o in range(1 + kind)]
        want = _slow_best(float(W[i, j]), float(fit.mu[i, kind, g]), levels)
        assert float(cand[g, i, j]) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("cgb", [False, True])
def test_regroup_moves_each_free_weight_to_its_nearer_group(cgb):
    W, fit = _random_fit(seed=1)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) < 0.75
    new = regroup(W, fit, keep, cgb)
    cand = group_candidates(W, fit)
    err = (W[None] - cand) ** 2
    for i, j in itertools.product(range(W.shape[0]), range(W.shape[1])):
        frozen = not keep[i, j] or (bool(fit.salient[j]) and not cgb)
        want = bool(fit.group[i, j]) if frozen else bool(err[1, i, j] < err[0, i, j])
        assert bool(new[i, j]) == want


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem()


# output errors on the fixed synthetic layer (blocksize 64, cgb, 1 thread, exact compensation), regroup 0 → 2
PINNED = {("rc", None): (0.0334565, 0.0270295), ("pbs2p", "6:8"): (0.0246514, 0.0207112),
          ("stbllm", "6:8"): (0.0397050, 0.0328432), ("pbs2p", "4:8"): (0.0431089, 0.0339033)}


@pytest.mark.parametrize("method,nm", list(PINNED))
def test_regroup_lowers_the_output_error_and_packs_exactly(problem, method, nm):
    kw = {"nm": nm} if nm else {}
    base = fit_one_thread(*problem, method=method, blocksize=64, cgb=True, **kw)[1]["output_err"]
    res, row, cfg = fit_one_thread(*problem, method=method, blocksize=64, cgb=True, regroup=2, **kw)
    assert row["output_err"] < 0.95 * base
    assert (base, row["output_err"]) == pytest.approx(PINNED[method, nm], rel=0.05)
    rec = get_method(method)
    p = layout_of(rec.layout).pack(res, rec.layout_params(cfg), "fp16")
    assert torch.equal(dequantize(p), res.dequantize())


def test_regroup_is_a_no_op_without_a_magnitude_split(problem):
    a = fit_one_thread(*problem, method="rc", blocksize=64, group_split=False)[0]
    b = fit_one_thread(*problem, method="rc", blocksize=64, group_split=False, regroup=3)[0]
    assert torch.equal(a.dequantize(), b.dequantize()) and not b.group.any()


def test_negative_regroup_is_refused():
    with pytest.raises(ArbqError, match="regroup"):
        BinarizeConfig(regroup=-1).checked()
