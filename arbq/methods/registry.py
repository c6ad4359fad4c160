"""`--method` name → Method: which group binarizers and refinements a method uses.

`BinarizeConfig.method` is looked up here (a dict, no if-chains); the block loop only calls the
functions a Method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from arbq.methods import binarizers as bz

GroupFit = Callable[[torch.Tensor, torch.Tensor, int], bz.Fit]   # (w, m, iters) -> Fit


@dataclass(frozen=True)
class Method:
    """How one method binarizes a block.

    fit1 / fit2:  order-1 (non-salient groups) and order-2 (salient groups) group binarizers
    mean_form:    stores a mean μ per row and group (False for RC: ŵ = α_r·α_c·b)
    x_refine:     after the ARB iterations, refine row parameters against S = H[block, block]
    search:       choose salient columns and magnitude splits (BiLLM structure); False = one group
    uses_hessian: runs inside the GPTQ loop with Hessian error compensation
    """

    name: str
    fit1: GroupFit
    fit2: GroupFit
    mean_form: bool = True
    x_refine: bool = False
    search: bool = True
    uses_hessian: bool = True


METHODS: dict[str, Method] = {
    "sign": Method("sign", bz.plain_order1, bz.plain_order2, search=False, uses_hessian=False),
    "billm": Method("billm", bz.plain_order1, bz.plain_order2),
    "arb": Method("arb", bz.arb_order1, bz.arb_order2),
    "x": Method("x", bz.arb_order1, bz.arb_order2, x_refine=True),
    "rc": Method("rc", bz.rc_order1, bz.rc_order2, mean_form=False),
}


def get_method(name: str) -> Method:
    return METHODS[name]
