"""Every hyperparameter of a binarization run, as one dataclass (a recipe is this, as YAML)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from arbq.errors import ArbqError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


@dataclass(frozen=True)
class BinarizeConfig:
    """Defaults are the ARB-LLM paper's (spec §1) except where noted.

    method:        registry key: sign | billm | arb | x | rc (see arbq.methods.registry)
    cgb:           column-group bitmap: split salient columns in two groups as well
    iters:         ARB refinement iterations on the chosen masks (paper: 15)
    x_iters:       calibration-aware (ARB-X) iterations after `iters` (x only; paper: 15)
    search_iters:  refinement iterations used while searching masks (reference: 0)
    search_fit:    "plain": score mask candidates with BiLLM's sign binarizers in closed form (fast,
                   exact; as the reference); "method": fit every candidate with the method's own
                   binarizers (`search_iters` refinements; ≈5× slower)
    split_error:   error that scores the non-salient split: "weight" ‖W − Ŵ‖² or "output"
                   tr(R S Rᵀ) of the whole block's residual (the reference's choice for ARB-X)
    blocksize:     columns per block of the GPTQ-style loop (paper: 128)
    percdamp:      Hessian damping λ, as a fraction of mean(diag H) (paper: 0.01)
    salient:       salience metric, "hessian" (W²/U_jj², default: measured better) or "magnitude"
    max_salient:   salient-column counts tried are 1 … max_salient (paper: up_lim − 1 = 49)
    split_points:  number of quantile thresholds tried for each magnitude split (paper: 81, 10%…90%)
    search_on:     "weight": search masks with errors measured on W (arbq); "salience": on the
                   salience-transformed matrix (W²/U_jj² for hessian, W for magnitude), as the reference
    split_quantiles: "members": split thresholds are quantiles of |w| over the group's own weights;
                   "with_zeros": the non-salient thresholds include the zeroed salient columns (reference)
    scale_dtype:   scales and means are rounded to this dtype (fp16 | bf16 | fp32) as each block is
                   fitted, so the error compensation, model-fake and `arbq pack` all see the stored values
    sequential:    binarize layer i on inputs from binarized layers 0..i-1
    true_sequential: inside a layer, take each linear group's Hessian after the groups before it
                   were binarized (False = one full-precision pass for all linears, as the reference)
    """

    method: str = "rc"
    cgb: bool = False
    iters: int = 15
    x_iters: int = 15
    search_iters: int = 0
    search_fit: str = "plain"
    split_error: str = "weight"
    blocksize: int = 128
    percdamp: float = 0.01
    salient: str = "hessian"
    max_salient: int = 49
    split_points: int = 81
    search_on: str = "weight"
    split_quantiles: str = "members"
    scale_dtype: str = "fp16"
    sequential: bool = True
    true_sequential: bool = False

    def replace(self, **overrides: Any) -> BinarizeConfig:
        """A copy with the non-None overrides applied (CLI flags override the recipe)."""
        known = {f.name for f in fields(self)}
        bad = set(overrides) - known
        if bad:
            raise ArbqError(f"unknown recipe keys: {', '.join(sorted(bad))}; known: {', '.join(sorted(known))}")
        vals = asdict(self)
        vals.update({k: v for k, v in overrides.items() if v is not None})
        return BinarizeConfig(**vals).checked()

    def checked(self) -> BinarizeConfig:
        from arbq.methods.registry import METHODS

        if self.method not in METHODS:
            raise ArbqError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.search_fit not in ("plain", "method"):
            raise ArbqError(f"unknown search_fit {self.search_fit!r}; choose plain or method")
        for key, allowed in (("search_on", ("weight", "salience")), ("split_quantiles", ("members", "with_zeros")),
                             ("split_error", ("weight", "output")), ("scale_dtype", ("fp16", "bf16", "fp32"))):
            if getattr(self, key) not in allowed:
                raise ArbqError(f"unknown {key} {getattr(self, key)!r}; choose {' or '.join(allowed)}")
        if self.salient not in ("hessian", "magnitude"):
            raise ArbqError(f"unknown salience metric {self.salient!r}; choose hessian or magnitude")
        for key in ("iters", "x_iters", "search_iters"):
            if getattr(self, key) < 0:
                raise ArbqError(f"{key} must be >= 0")
        if self.blocksize < 8 or self.blocksize % 8:
            raise ArbqError("blocksize must be a positive multiple of 8")
        if not 0 < self.percdamp < 10:
            raise ArbqError("percdamp must be in (0, 10)")
        if self.max_salient < 1 or self.split_points < 1:
            raise ArbqError("max_salient and split_points must be >= 1")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_recipe(spec: str | None) -> BinarizeConfig:
    """A recipe from a YAML path or a bare name under recipes/ (e.g. `rc-cgb`); None = defaults."""
    if spec is None:
        return BinarizeConfig().checked()
    path = Path(spec)
    if not path.is_file():
        path = RECIPES_DIR / f"{spec}.yaml"
    if not path.is_file():
        avail = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
        raise ArbqError(f"recipe not found: {spec} (available: {', '.join(avail) or 'none'})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ArbqError(f"invalid YAML in recipe {path}: {e}") from None
    if not isinstance(data, dict):
        raise ArbqError(f"recipe {path} must be a mapping of hyperparameters")
    data = data.get("binarize", data)
    return BinarizeConfig().replace(**data)
