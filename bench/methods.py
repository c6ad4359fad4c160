"""What each benchmarked name means: a base recipe plus overrides, and how `arbq binarize` is called.

Main methods (quality table): sign, billm, arb, x, rc, x+cgb, rc+cgb (plus "fp", the model itself).
Reference block: for a family (rc+cgb, x+cgb) the reference-equivalent recipe of the reference code's
best configuration (recipes/reference-*-hessian.yaml), one run per recipe key in which it differs from
arbq's default (that key set to arbq's value, one change at a time), arbq's default, arbq's default with
one option that is not the default (ABLATIONS), and the reference code's own default (magnitude salience).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from arbq.methods.config import BinarizeConfig, load_recipe

FP = "fp"
# name -> (base recipe, overrides): the same choices a user makes with `--recipe` and flags
METHODS: dict[str, tuple[str | None, dict]] = {
    "sign": ("sign", {}),
    "billm": ("billm", {}),
    "arb": ("arb", {}),
    "x": (None, {"method": "x", "cgb": False}),
    "rc": (None, {"method": "rc", "cgb": False}),
    "x+cgb": ("x-cgb", {}),
    "rc+cgb": ("rc-cgb", {}),
    # storage options below 2.5 honest bits (issue 15): less side information
    "rc+cgb-b256": ("rc-cgb", {"blocksize": 256}),
    "rc-nosplit": ("rc-nosplit", {}),
    "rc-nosplit-b256": ("rc-nosplit", {"blocksize": 256}),
    "rc-nosalient": (None, {"method": "rc", "cgb": False, "max_salient": 0}),
    "rc+cgb-tuned": ("rc-cgb-tuned", {}),                 # rc-cgb + block-wise reconstruction, same bits
    "rc+cgb-2bit": ("rc-cgb-2bit", {}),                   # b512, 16 salient, fp8, block-wise reconstruction
    "rc+cgb-2bit-notune": ("rc-cgb-2bit", {"tune_epochs": 0}),
    "rc-nosplit-tuned": ("rc-nosplit-tuned", {}),            # ≈ 1.4 bits: no group plane, reconstruction
    # N:M pruning with binarization (issue 14): the stepwise method and the prune-then-binarize baseline
    **{f"{meth}-{n}of8": (meth, {"nm": f"{n}:8"}) for meth in ("pbs2p", "stbllm") for n in (6, 5, 4)},
    **{f"{meth}-2of4": (meth, {"nm": "2:4"}) for meth in ("pbs2p", "stbllm")},   # the GPU sparse-core pattern
    "pbs2p-6of8-tuned": ("pbs2p-tuned", {}),                # pbs2p 6:8 + block-wise reconstruction, same bits
    "stbllm-6of8-tuned": ("stbllm", {"tune_epochs": 4, "tune_lr": 0.01, "tune_target": "model"}),
    # STBLLM's own binarizer family (BiLLM's structure; its trisection is not built) under the same one-shot mask
    **{f"stbllm-billm-{n}of8": ("stbllm", {"nm": f"{n}:8", "nm_base": "billm", "cgb": False, "regroup": 0})
       for n in (6, 5, 4)},
    "rc+cgb-noregroup": ("rc-cgb", {"regroup": 0}),       # the paper's split (arbq's default before regroup)
    # the k-bit baseline at group 64 (the comparison with llm-compressor's GPTQ at the same setting)
    "gptq-4b": ("gptq-4b-g64", {}),
    "gptq-3b": ("gptq-3b-g64", {}),
    "gptq-2b": ("gptq-2b-g64", {}),
    "gptq-2b-g128": ("gptq-2b-g64", {"group": 128}),
    "gptq-2b-g128-keep0.005": ("gptq-2b-g64", {"group": 128, "keep_columns": 0.005}),
}
ALL_METHODS = (FP, *METHODS)
# family -> (default recipe, reference-equivalent recipe, further reference recipes)
REFERENCE = {"rc+cgb": ("rc-cgb", "reference-rc-cgb-hessian", ("reference-rc-cgb",)),
             "x+cgb": ("x-cgb", "reference-x-cgb-hessian", ("reference-x-cgb",))}
# further one-change runs from arbq's default: options measured but not (yet) made the default
ABLATIONS = {"rc+cgb": {"true_sequential": True}, "x+cgb": {"split_error": "output"}}
# --quick: a smaller search so that a smoke test binarizes in about a minute (numbers not meaningful)
QUICK_OVERRIDES = {"iters": 1, "x_iters": 1, "max_salient": 4, "split_points": 5}
# recipe keys that `arbq binarize` accepts as flags (others need a recipe file)
FLAGS = {"method": "--method", "cgb": ("--cgb", "--no-cgb"), "iters": "--iters", "x_iters": "--x-iters",
         "search_iters": "--search-iters", "search_fit": "--search-fit", "blocksize": "--blocksize",
         "percdamp": "--percdamp", "split_error": "--split-error", "search_on": "--search-on",
         "split_quantiles": "--split-quantiles",
         "salient": "--salient", "sequential": ("--sequential", "--no-sequential"), "bits": "--bits",
         "group": "--group", "keep_columns": "--keep-columns",
         "nm": "--nm", "nm_metric": "--nm-metric", "act_order": ("--act-order", "--no-act-order"),
         "true_sequential": ("--true-sequential", "--no-true-sequential"), "tune_epochs": "--tune-epochs",
         "tune_lr": "--tune-lr", "tune_target": "--tune-target"}


@dataclass(frozen=True)
class RunSpec:
    """One binarization run: `name` (also its directory name), base recipe and overrides."""

    name: str
    recipe: str | None
    overrides: dict = field(default_factory=dict)
    note: str = ""

    def config(self) -> BinarizeConfig:
        return load_recipe(self.recipe).replace(**self.overrides)

    def binarize_args(self, recipe_dir: Path) -> list[str]:
        """`arbq binarize` arguments after MODEL (without -o/--calib): --recipe NAME plus flags, or a
        recipe file written to recipe_dir when an override has no flag (e.g. search_fit)."""
        if all(k in FLAGS for k in self.overrides):
            args = ["--recipe", self.recipe] if self.recipe else []
            for k, v in self.overrides.items():
                flag = FLAGS[k]
                args += [flag[0] if v else flag[1]] if isinstance(flag, tuple) else [flag, str(v)]
            return args
        path = recipe_dir / f"{self.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# bench run {self.name}: {self.recipe or 'defaults'} + {self.overrides}\n"
                        + yaml.safe_dump({"binarize": self.config().to_dict()}, sort_keys=False))
        return ["--recipe", str(path)]


def main_runs(names: list[str], extra: dict) -> list[RunSpec]:
    """RunSpecs of the main methods in `names` (fp excluded), each with the `extra` overrides."""
    return [RunSpec(n, METHODS[n][0], {**METHODS[n][1], **extra}) for n in names if n != FP]


def reference_runs(family: str, extra: dict, others: bool = False, ablations: bool = True) -> list[RunSpec]:
    """[reference-equivalent, reference with one arbq change per differing key..., arbq default, (with
    `ablations`) the ABLATIONS runs, (with `others`) further reference recipes] for a family (e.g. rc+cgb)."""
    default, ref, more = REFERENCE[family]
    d, r = load_recipe(default).to_dict(), load_recipe(ref).to_dict()
    diff = {k: d[k] for k in d if d[k] != r[k]}
    runs = [RunSpec(ref, ref, dict(extra), note="reference-equivalent (the reference code's best configuration)")]
    if len(diff) > 1:
        runs += [RunSpec(f"{ref}@{k}={v}", ref, {**extra, k: v}, note=f"reference, {k}: {r[k]} → {v}")
                 for k, v in diff.items()]
    note = "arbq default: " + ", ".join(f"{k}={v}" for k, v in diff.items())
    runs.append(RunSpec(family, default, dict(extra), note=note))
    runs += [RunSpec(f"{family}@{k}={v}", default, {**extra, k: v}, note=f"arbq default, {k}={v}")
             for k, v in ABLATIONS.get(family, {}).items() if ablations]
    runs += [RunSpec(o, o, dict(extra), note="the reference code's default configuration") for o in more if others]
    return runs
