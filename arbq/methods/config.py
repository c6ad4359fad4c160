"""Every hyperparameter of a binarization run, as one dataclass (a recipe is this, as YAML)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from arbq.errors import ArbqError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# keys that hold for the whole run (a per-module override cannot change them)
GLOBAL_KEYS = ("sequential", "true_sequential", "overrides", "ignore", "nm_cfs", "tune_epochs", "tune_lr",
               "tune_target")
CHOICES = {"search_fit": ("plain", "method"), "search_on": ("weight", "salience"),
           "split_quantiles": ("members", "with_zeros"), "split_error": ("weight", "output"),
           "scale_dtype": ("fp16", "bf16", "fp32", "fp8"), "salient": ("hessian", "magnitude"),
           "nm_metric": ("hessian", "wanda"), "tune_target": ("layer", "model"), "nm_base": ("rc", "x", "arb", "billm"),
           "compensation": ("exact", "diagonal"), "nm_masks": ("dense", "pruned")}

# keys added with a default that differs from what the code did before them: the value a recorded run without
# the key was made with (a run made before `compensation` existed used the diagonal compensation)
BEFORE_KEY = {"compensation": "diagonal"}


@dataclass(frozen=True)
class BinarizeConfig:
    """Defaults are the ARB-LLM paper's (spec §1) except where noted.

    method:        registry key: rc | x | arb | billm | sign | gptq | pbs2p | stbllm (arbq.methods.registry)
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
    compensation:  binary methods: the errors a finished block pushes to the later columns
                   (arbq.methods.gptq.block_errors): "exact" (arbq's: Err = (W_b − Q)·U_b⁻¹, GPTQ's column
                   recursion with the block's Q fixed; on 12 of the fixture's linears, output error 15% lower for
                   rc+cgb and pbs2p 6:8, 8% for stbllm 6:8) or "diagonal" (the BiLLM / ARB-LLM reference code's
                   Err = (W_b − Q)/diag U_b)
    run_order:     binary methods with a Hessian (billm, arb, x, rc): the block loop takes the runs of 8 input
                   columns in decreasing Σ_{j ∈ run} H_jj (GPTQ's act order, by whole runs: one byte of every bit
                   plane) instead of left to right; the layout stores the run order (16 bits per run, the
                   "run_order" component) and kernels read x[..., π]. false = left to right
    polish:        binary methods with a Hessian and pbs2p / stbllm: rounds of polishing each fitted block against
                   the loss it leaves, ‖(W_b − Ŵ)·U_b⁻¹‖² (arbq.methods.polish): its codes by GPTQ's column recursion
                   with the scales fixed (pbs2p: with its N:M positions re-chosen run by run), then its row scales
                   and means by least squares with the codes fixed; each step kept only if that loss went down.
                   0 = off (the fit's own nearest codes and ARB scales, as the reference)
    percdamp:      Hessian damping λ, as a fraction of mean(diag H) (paper: 0.01)
    salient:       salience metric, "hessian" (W²/U_jj², default: measured better) or "magnitude"
    max_salient:   salient-column counts tried are 1 … max_salient (paper: up_lim − 1 = 49); 0 = no salient
                   columns, and the packed layout stores no second sign, bitmap or salient scales
    group_split:   split the non-salient columns by magnitude into two groups with their own scales (a group
                   bit per weight, BiLLM's bell-shaped split); false = one group and no group-bit plane
                   (needs cgb false)
    split_points:  number of quantile thresholds tried for each magnitude split (paper: 81, 10%…90%)
    regroup:       rounds of group reassignment after each block fit (methods with a magnitude split): every
                   weight moves to the group whose fitted scales represent it better, then the groups are
                   re-fitted (Lloyd steps from BiLLM's threshold split; the bits stored are the same). 0 = off
    search_on:     "weight": search masks with errors measured on W (arbq); "salience": on the
                   salience-transformed matrix (W²/U_jj² for hessian, W for magnitude), as the reference
    split_quantiles: "members": split thresholds are quantiles of |w| over the group's own weights;
                   "with_zeros": the non-salient thresholds include the zeroed salient columns (reference)
    scale_dtype:   scales and means are rounded to this dtype (fp16 | bf16 | fp32) as each block is
                   fitted, so the error compensation, model-fake and `arbq pack` all see the stored values; fp8
                   (e4m3 with a per-tensor factor, binary methods): blocks round to fp16 and the finished linear
                   to the fp8 values `arbq pack` stores
    bits, group:   uniform methods (gptq): bits per code, columns per scale/zero group
    act_order:     gptq: process columns by decreasing H_jj with group parameters fixed beforehand
                   (llm-compressor's default "static" ordering); False = left to right, as GPTQ's reference
    keep_columns:  gptq: fraction of each linear's input columns kept in fp16 (the most sensitive by
                   H_jj·‖W_:,j‖², processed last; OWQ), e.g. 0.005 — 16·f bits per weight more
    nm:            pbs2p / stbllm: keep N of every M consecutive input columns of a row ("6:8", "5:8", "4:8", "2:4")
    nm_metric:     pruning score weight of column j: "hessian" 1/[U_jj]² (OBS) or "wanda" H_jj ∝ ‖X_j‖²
    nm_base:       the binary strategy of the kept weights (rc | x | arb | billm)
    nm_stepwise:   pbs2p: prune one more weight per run of M per step, re-fitting in between (SPBO); false =
                   all at once per block
    nm_compensate: pbs2p: after each step, OBS/GPTQ updates of the pruned entries inside the block, column by
                   column, onto the block's later kept weights (the binarizer re-fits the updated survivors);
                   false = what was pruned is compensated in the later blocks only
    nm_reprune:    pbs2p: rounds of N:M position reassignment after the last step (Lloyd steps over the levels
                   {0, the groups' binary levels}): in every run of M the N weights whose zero costs most
                   against their best binary level are kept, then the groups are re-fitted; a round is kept
                   only if the block's weighted error went down. 0 = off
    nm_substeps:   pbs2p: sub-masks per pruning step (τ = nm_substeps · (M − N)): sub-step i of step t prunes
                   the t-th weight in the runs of lowest cost of each row until i/nm_substeps of the row's runs
                   have lost it, re-fitting in between; 1 = one weight in every run per step
    nm_masks:      pbs2p: where the salient columns and the group split are chosen: "dense" on the block before
                   any pruning (the paper's step 0); "pruned" on the block with its one-shot N:M mask (the same
                   score as stbllm's) zeroed, as stbllm chooses them on its pruned weights
    nm_act_order:  pbs2p / stbllm: the block loop takes the runs of M columns in decreasing Σ_{j ∈ run} H_jj
                   (GPTQ's act order, whole runs moved so that every stored run is still N:M) instead of left to
                   right; the layout stores the run order (16 bits per run). false = left to right
    nm_cfs:        pbs2p / stbllm coarse stage (CFS, arbq.methods.cfs): each decoder layer gets its own N in
                   [N − nm_cfs, N + nm_cfs] by its calibration block influence, the mean N staying N; 0 = off.
                   Needs statistics from `arbq calibrate` (the layer scores). Whole-run key
    tune_epochs:   block-wise reconstruction (arbq.methods.reconstruct): after a decoder layer is binarized, this
                   many passes of Adam over the calibration samples tune its stored values (scales, means, column
                   scales; the bits stay) to the layer's full-precision output on the same inputs; 0 = off.
                   Needs sequential. Whole-run key
    tune_lr:       the reconstruction's Adam step size, relative (1e-3 ≈ 0.1% of a scale per step). Whole-run key
    tune_target:   what a layer is tuned towards: "layer" (the full-precision layer on the same, already
                   binarized, inputs) or "model" (the full-precision model's own outputs of that layer, from a
                   second activation stream: each layer also makes up for the layers before it). Whole-run key
    sequential:    binarize layer i on inputs from binarized layers 0..i-1
    true_sequential: inside a layer, take each linear group's Hessian after the groups before it
                   were binarized (False = one full-precision pass for all linears, as the reference)
    overrides:     per-module settings, applied in order to the modules they target (later ones win):
                   [{"targets": ["re:.*mlp\\.down_proj", "model.layers.0.self_attn.q_proj", "o_proj"], "method":
                   "gptq", "bits": 4}, ...]; a target is a full module name, a dotted suffix of one, or
                   "re:" + a regular expression that must match the whole name
    ignore:        targets (same syntax) left in full precision
    """

    method: str = "rc"
    cgb: bool = False
    iters: int = 15
    x_iters: int = 15
    search_iters: int = 0
    search_fit: str = "plain"
    split_error: str = "weight"
    blocksize: int = 128
    compensation: str = "exact"
    run_order: bool = False
    polish: int = 0
    percdamp: float = 0.01
    salient: str = "hessian"
    max_salient: int = 49
    group_split: bool = True
    split_points: int = 81
    regroup: int = 0
    search_on: str = "weight"
    split_quantiles: str = "members"
    scale_dtype: str = "fp16"
    bits: int = 4
    group: int = 128
    act_order: bool = True
    keep_columns: float = 0.0
    nm: str = "6:8"
    nm_metric: str = "hessian"
    nm_base: str = "rc"
    nm_stepwise: bool = True
    nm_compensate: bool = False
    nm_cfs: int = 0
    nm_reprune: int = 0
    nm_substeps: int = 1
    nm_masks: str = "dense"
    nm_act_order: bool = False
    tune_epochs: int = 0
    tune_lr: float = 1e-3
    tune_target: str = "layer"
    sequential: bool = True
    true_sequential: bool = False
    overrides: tuple = ()
    ignore: tuple = ()

    def replace(self, **overrides: Any) -> BinarizeConfig:
        """A copy with the non-None overrides applied (CLI flags override the recipe)."""
        known = {f.name for f in fields(self)}
        bad = set(overrides) - known
        if bad:
            raise ArbqError(f"unknown recipe keys: {', '.join(sorted(bad))}; known: {', '.join(sorted(known))}")
        vals = asdict(self)
        vals.update({k: v for k, v in overrides.items() if v is not None})
        return BinarizeConfig(**vals).checked()

    def with_flags(self, **flags: Any) -> BinarizeConfig:
        """`replace` for keys a user named (the CLI's flags; None = not given), where a key that only other
        methods read is an error instead of a silent no-op (`--nm 6:8 --method rc`). A key counts as read if
        the recipe's method or a per-module override's method reads it (MethodRecord.reads); keys no method
        lists (method, sequential, tune_*, ...) are read by the stage."""
        from arbq.methods.registry import METHODS

        cfg = self.replace(**flags)
        used = {cfg.method} | {o["method"] for o in cfg.overrides if "method" in o}
        read = frozenset().union(*(METHODS[m].reads for m in used))
        for key in sorted(k for k, v in flags.items() if v is not None and k not in read):
            readers = [name for name, rec in METHODS.items() if key in rec.reads]
            if readers:
                raise ArbqError(f"recipe: {key} is read by {', '.join(readers)}, not by method "
                                f"{' / '.join(sorted(used))}; drop it or choose one of those methods")
        return cfg

    def checked(self) -> BinarizeConfig:
        """Types, ranges and choices of every key (one line naming the bad key), the method's own checks,
        and every override resolved and checked the same way."""
        from arbq.methods.registry import get_method

        _check_types(self)
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ArbqError(f"recipe: unknown {key} {getattr(self, key)!r}; choose {' or '.join(allowed)}")
        for key in ("iters", "x_iters", "search_iters", "regroup", "nm_reprune", "tune_epochs", "polish"):
            if getattr(self, key) < 0:
                raise ArbqError(f"recipe: {key} must be >= 0")
        if self.nm_substeps < 1:
            raise ArbqError("recipe: nm_substeps must be >= 1")
        if self.blocksize < 8 or self.blocksize % 8:
            raise ArbqError("recipe: blocksize must be a positive multiple of 8")
        if not 0 < self.percdamp < 10:
            raise ArbqError("recipe: percdamp must be in (0, 10)")
        if self.max_salient < 0 or self.split_points < 1:
            raise ArbqError("recipe: max_salient must be >= 0 and split_points >= 1")
        if not 0 < self.tune_lr < 1:
            raise ArbqError("recipe: tune_lr must be in (0, 1)")
        if self.tune_epochs and not self.sequential:
            raise ArbqError("recipe: tune_epochs needs sequential (the reconstruction runs on the layer's inputs)")
        if self.cgb and not self.group_split:
            raise ArbqError("recipe: cgb needs group_split (the group bits of salient columns live in its plane)")
        rec = get_method(self.method)
        if rec.check:
            rec.check(self)
        overrides = tuple(_checked_override(o, i) for i, o in enumerate(self.overrides))
        ignore = tuple(_targets(list(self.ignore), "ignore"))
        out = self if (overrides, ignore) == (self.overrides, self.ignore) else \
            BinarizeConfig(**{**asdict(self), "overrides": overrides, "ignore": ignore})
        methods = {self.method}   # an override without `method` may stack on an earlier one's method
        for i, o in enumerate(overrides):
            sub = out.with_override(o)
            candidates = {sub.method} if "method" in o else methods
            bad = set(o) - {"targets", "method"} - {k for m in candidates for k in get_method(m).keys}
            if bad:
                raise ArbqError(f"recipe: override {i} sets {', '.join(sorted(bad))}, which method "
                                f"{' / '.join(sorted(candidates))} does not read")
            sub.checked()
            methods = methods | {sub.method}
        return out

    @property
    def needs_layer_scores(self) -> bool:
        """The run reads every layer's calibration score (CFS), so its calibration needs statistics."""
        return self.nm_cfs > 0

    def check_modules(self, names: list[str]) -> None:
        """Resolve every module's settings before any work starts: each must be a valid recipe whose method
        reads every key its overrides set (one line naming the module)."""
        from arbq.methods.registry import get_method

        for name in names:
            cfg = self.for_module(name)
            if cfg is None:
                continue
            keys = {k for o in self.overrides if any(target_matches(t, name) for t in o["targets"]) for k in o}
            bad = keys - {"targets", "method"} - set(get_method(cfg.method).keys)
            if bad:
                raise ArbqError(f"recipe: {name} gets {', '.join(sorted(bad))} from an override, but its method "
                                f"{cfg.method!r} does not read it")
            cfg.checked()

    def with_override(self, override: dict) -> BinarizeConfig:
        vals = asdict(self)
        vals.update({k: v for k, v in override.items() if k != "targets"})
        return BinarizeConfig(**{**vals, "overrides": (), "ignore": ()})

    def for_module(self, name: str) -> BinarizeConfig | None:
        """The settings of the module `name` (e.g. model.layers.3.mlp.down_proj): the recipe with every
        override that targets it applied in order; None when `ignore` targets it (kept full precision)."""
        if any(target_matches(t, name) for t in self.ignore):
            return None
        out = self
        for o in self.overrides:
            if any(target_matches(t, name) for t in o["targets"]):
                out = out.with_override(o)
        return out   # with_override already dropped overrides and ignore

    def label(self) -> str:
        """e.g. rc+cgb, gptq-3b-g64: how reports name the method of a module."""
        from arbq.methods.registry import get_method

        rec = get_method(self.method)
        if rec.label:
            return rec.label(self)
        return self.method + ("+cgb" if self.cgb and rec.layout_params(self).get("cgb") else "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = [dict(o) for o in self.overrides]
        d["ignore"] = list(self.ignore)
        return d

    @classmethod
    def from_dict(cls, recipe: dict) -> BinarizeConfig:
        """A recorded recipe (run.json), older ones completed with the defaults of keys added since, or with
        BEFORE_KEY's value where the key's default changed what the code did."""
        return cls().replace(**(BEFORE_KEY | recipe))


def target_matches(target: str, name: str) -> bool:
    """`re:REGEX` matches the whole name; otherwise the full name or a dotted suffix of it."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return name == target or name.endswith("." + target)


def _targets(targets: Any, where: str) -> list[str]:
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ArbqError(f"recipe: {where} must be a list of module names or 're:' patterns")
    for t in targets:
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise ArbqError(f"recipe: {where}: bad regular expression {t!r}: {e}") from None
    return targets


def _checked_override(o: Any, i: int) -> dict:
    if not isinstance(o, dict) or "targets" not in o:
        raise ArbqError(f"recipe: override {i} must be a mapping with 'targets'")
    known = {f.name for f in fields(BinarizeConfig)} - set(GLOBAL_KEYS)
    bad = set(o) - known - {"targets"}
    if bad:
        raise ArbqError(f"recipe: override {i} has keys that cannot be set per module: {', '.join(sorted(bad))}")
    return {**o, "targets": _targets(o["targets"], f"override {i} targets")}


def _check_types(cfg: BinarizeConfig) -> None:
    """Every key has its default's type (bool is not an int, "false" is not a bool; floats accept ints)."""
    for f in fields(cfg):
        want, v = type(f.default), getattr(cfg, f.name)
        if want is tuple:
            ok = isinstance(v, (list, tuple))
        elif want is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, want) and (want is bool or not isinstance(v, bool))
        if not ok:
            raise ArbqError(f"recipe: {f.name} must be {want.__name__ if want is not tuple else 'a list'}, "
                            f"got {v!r}")


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
