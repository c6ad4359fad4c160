"""CFS, the coarse stage of PBS²P (spec: ../shared/spec/pbs2p.md §1.2–1.3): every decoder layer gets its
own N of the N:M pattern around the recipe's target, more kept weights for layers that change their hidden
states more, and the model-wide mean N equal to the target.

Layer score: block influence BI_i = 1 − mean_t cos(h_t, f_i(h)_t) of the full-precision model on the
calibration tokens (arbq.models.layerwise.block_influence, recorded by `arbq calibrate`).
Mapping (recipe key nm_cfs = s, the spread): the layer of rank r among L (r = 0 least influential) aims at

    t_r = n + s · (2r − (L − 1)) / (L − 1)          (linear in rank from n − s to n + s; Σ_r t_r = L·n)

and the targets are rounded by largest remainder (ties to the more influential layer), so Σ N_i = L·n
exactly: every decoder layer holds the same linears, so the mean over layers is the mean over weights.
Rank rather than the score's value: the first and last layers' scores are outliers that a linear map of
the value would give the whole band to.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

from arbq.errors import ArbqError


def allocate_n(influence: list[float], n: int, m: int, spread: int) -> list[int]:
    """Per-layer N_i (see the module docstring) for scores influence [L]; n − spread ≥ 1, n + spread < m."""
    if spread < 0 or n - spread < 1 or n + spread >= m:
        raise ArbqError(f"recipe: nm_cfs {spread} around {n}:{m} leaves 1 <= N < {m} (need {n} - nm_cfs >= 1 and "
                        f"{n} + nm_cfs < {m})")
    L = len(influence)
    if L < 2 or spread == 0:
        return [n] * L
    order = sorted(range(L), key=lambda i: (influence[i], i))          # rank 0 = least influential
    target = {i: n + Fraction(spread * (2 * r - (L - 1)), L - 1) for r, i in enumerate(order)}
    out = {i: int(t.__floor__()) for i, t in target.items()}
    left = L * n - sum(out.values())
    by_remainder = sorted(order, key=lambda i: (target[i] - out[i], order.index(i)), reverse=True)
    for i in by_remainder[:left]:
        out[i] += 1
    return [out[i] for i in range(L)]


def layer_plan(nm: str, spread: int, parse: Callable[[str], tuple[int, int]],
               influence: Callable[[], list[float]]) -> list[dict] | None:
    """Per decoder layer, the recipe keys CFS sets ({"nm": "N_i:M"}); None when spread is 0 (no CFS)."""
    if not spread:
        return None
    n, m = parse(nm)
    return [{"nm": f"{k}:{m}"} for k in allocate_n(influence(), n, m, spread)]
