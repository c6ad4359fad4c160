"""The binary family (BiLLM structure, ARB refinements): sign, billm, arb, x, rc — one record each.

Every member is the same block loop (arbq.methods.gptq.binarize_linear) with its own group binarizers
and refinements (`BinaryMethod`), and writes the "binary" packed layout with the scheme its strategy
implies: column scales instead of means for RC, salient columns and group bits where masks are searched,
group bits in salient columns with CGB (arbq.packed.format).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from arbq.methods import binarizers as bz
from arbq.methods.config import BinarizeConfig
from arbq.methods.record import MethodRecord
from arbq.methods.result import LinearResult

GroupFit = Callable[[torch.Tensor, torch.Tensor, int], bz.Fit]   # (w, m, iters) -> Fit


@dataclass(frozen=True)
class BinaryMethod:
    """How one binary method binarizes a block.

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

    def scheme_params(self, cfg: BinarizeConfig) -> dict:
        """The packed scheme this strategy's results fit (arbq.packed.format.Scheme) and the blocksize."""
        salient = self.search and cfg.max_salient > 0
        return {"rc": not self.mean_form, "salient": salient, "group": self.search and cfg.group_split,
                "cgb": bool(cfg.cgb) and salient, "blocksize": cfg.blocksize}


STRATEGIES: dict[str, BinaryMethod] = {
    "sign": BinaryMethod("sign", bz.plain_order1, bz.plain_order2, search=False, uses_hessian=False),
    "billm": BinaryMethod("billm", bz.plain_order1, bz.plain_order2),
    "arb": BinaryMethod("arb", bz.arb_order1, bz.arb_order2),
    "x": BinaryMethod("x", bz.arb_order1, bz.arb_order2, x_refine=True),
    "rc": BinaryMethod("rc", bz.rc_order1, bz.rc_order2, mean_form=False),
}

SUMMARIES = {
    "sign": "sign(W) with one mean-form scale per row and block (floor)",
    "billm": "BiLLM: salient columns with a second-order residual, bell-shaped magnitude split",
    "arb": "ARB: BiLLM's structure with alternating refined scales and means",
    "x": "ARB-X: ARB refined against the calibration Gram matrix",
    "rc": "ARB-RC: row and column scales, no means (ARB-LLM_RC with --cgb)",
}


def _record(strategy: BinaryMethod) -> MethodRecord:
    def fit(W: torch.Tensor, H: torch.Tensor | None, cfg: BinarizeConfig, name: str):
        from arbq.methods.gptq import binarize_linear

        return binarize_linear(W, H, cfg, name, strategy)

    return MethodRecord(name=strategy.name, summary=SUMMARIES[strategy.name], fit=fit, layout="binary",
                        layout_params=strategy.scheme_params, result_type=LinearResult,
                        uses_hessian=strategy.uses_hessian,
                        keys=(*BINARY_KEYS, "run_order", "polish") if strategy.uses_hessian else BINARY_KEYS)


# recipe keys these methods read (others are refused in a per-module override for them)
BINARY_KEYS = ("cgb", "iters", "x_iters", "search_iters", "search_fit", "split_error", "blocksize", "percdamp",
               "salient", "max_salient", "group_split", "split_points", "regroup", "search_on", "split_quantiles",
               "scale_dtype", "compensation")
RECORDS = [_record(s) for s in STRATEGIES.values()]
