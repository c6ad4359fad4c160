"""`python -m bench.run` (`make bench`): the quality, speed and size report to check before trusting arbq.

Stages, on the fixture model (SmolLM2-135M) and text (botchan.txt), in a resumable work dir (--out):
1. quality: one `arbq calibrate` (botchan.txt@0:0.8), `arbq binarize --calib` per method (same samples for
   all), GPTQ-protocol perplexity on botchan.txt and the held-out botchan.txt@0.8:1, lm-eval botchan_cloze;
   1b. reference-equivalent recipes vs the defaults, one change at a time;
2. binarize cost (wall, peak RSS, fit seconds per layer); 3. size (`arbq pack`, honest and paper bits);
4. kernels (packed vs dense matmul, batch 1 and 128) and end-to-end greedy decode, packed vs dense;
5. end-to-end decode and RSS on a synthetic Llama with 4096-class layers, every packed layout vs dense fp32/bf16,
   on CPU whatever --device (bench.e2e; --e2e-layers, --skip-e2e; models cached in OUT/e2e).

results.json (written atomically after every step) holds every printed figure under a key path:
    quality/METHOD/{botchan,heldout}_{ppl,text,protocol,seqlen,windows,windows_total,tokens}
    quality/METHOD/botchan_cloze_{acc,acc_stderr,acc_norm,acc_norm_stderr,n},
    quality/rc+cgb/{packed_heldout_ppl,packed_fp8_heldout_ppl} (size/rc+cgb-fp8/...: the fp8-scale pack)
    reference/RUN/{note,heldout_ppl,botchan_ppl,binarize_wall_s,bits_per_weight,status}
    binarize/RUN/{wall_s,peak_rss_mb,peak_gpu_mb,layer_avg_s,layers,command,recipe,resumed,reused}
    size/RUN/{bits_per_weight,bits_per_weight_paper,model_bits_per_param,packed_weights_mb,packed_dir_mb,
              fp16_mb,compression_vs_fp16,bits_by_component}
    kernels/NxK/{bits_per_weight,ceiling_vs_fp32}, kernels/NxK/batchB/{dense,packed}_{median,p10,p90}_ms,
    kernels/NxK/batchB/speedup_vs_dense (hot), kernels/NxK/batchB/cold/... (CPU); the same under
    kernels/METHOD/NxK/... for --kernel-methods (default billm)
    decode/{dense,packed}_{tokens_per_s,prefill_ms,text}, decode/speedup_vs_dense, decode/bits_per_weight
    e2e/{model,prompt_tokens,new_tokens,repeats,threads,build,wall_s}, e2e/variants/KIND/{prefill_ms,
        tokens_per_s,speedup_vs_fp32,speedup_vs_bf16,rss_{base,load,run}_mb,peak_rss_mb,file_mb,mem_ratio,
        bits_per_weight,...} (KIND: dense-fp32, dense-bf16, packed-METHOD[-bf16]; fields: bench/e2e.py)
    machine/..., git_commit, git_dirty, config/..., calibrate/..., timing/..._s, errors/..., notes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = REPO / "arbq" / "recipes" / "tasks" / "botchan_cloze.yaml"
SHAPES = "576x576,192x576,1536x576,576x1536,4096x4096,11008x4096"
DEFAULTS = {"methods": "fp,sign,billm,arb,x,rc,x+cgb,rc+cgb,rc+cgb-b256,rc-nosplit,rc-nosplit-b256,rc-nosalient,"
                        "pbs2p-6of8,pbs2p-5of8,pbs2p-4of8,stbllm-6of8,stbllm-5of8,stbllm-4of8,"
                        "gptq-4b,gptq-3b,gptq-2b,gptq-2b-g128,gptq-2b-g128-keep0.005", "nsamples": 16, "seqlen": 512,
            "max_windows": 8,
            "heldout_max_windows": 0, "task_limit": 40, "shapes": SHAPES, "kernel_repeats": 21, "warmup": 5,
            "new_tokens": 32, "decode_repeats": 5, "cold": True,
            "e2e_layers": 2, "e2e_repeats": 3, "e2e_new_tokens": 16, "e2e_prompt_tokens": 128}
QUICK = {"methods": "fp,sign,rc+cgb", "nsamples": 2, "seqlen": 128, "max_windows": 1, "heldout_max_windows": 1,
         "task_limit": 4, "shapes": "576x576,1536x576", "kernel_repeats": 5, "warmup": 2, "new_tokens": 8,
         "decode_repeats": 2, "cold": False, "e2e_layers": 1, "e2e_repeats": 1, "e2e_new_tokens": 4,
         "e2e_prompt_tokens": 16}
# --quick: the e2e model at toy dimensions instead of the Llama-2-7B layer shapes
E2E_QUICK_DIMS = {"hidden": 256, "intermediate": 512, "heads": 4, "kv_heads": 4, "vocab": 1000}
PAPER = {"nsamples": 128, "seqlen": 2048}


# table 4 besides rc+cgb: every method's compact layout and its NAME/lut form (pbs2p and stbllm write the same
# binary_nm layout)
KERNEL_METHODS = ("rc+cgb/lut,billm,billm/lut,x+cgb,x+cgb/lut,sign,"
                  "pbs2p-6of8,pbs2p-6of8/lut,pbs2p-5of8,pbs2p-5of8/lut,pbs2p-4of8,pbs2p-4of8/lut")

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.e2e import METHODS as E2E_METHODS

    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--methods", help=f"comma list of {DEFAULTS['methods']} (default all; quick {QUICK['methods']})")
    a("--nsamples", type=int, help="calibration windows (default 16; --paper 128)")
    a("--seqlen", type=int, help="calibration window length (default 512; --paper 2048)")
    a("--paper", action="store_true", help="calibration as the paper: 128 × 2048 (far beyond 60 min on 2 cores)")
    a("--seed", type=int, default=0, help="calibration sampling seed")
    a("--no-sequential", action="store_true", help="binarize from stored full-precision statistics")
    a("--max-windows", type=int, help="botchan.txt perplexity: first N windows (default 8 to fit 60 min; 0 = all)")
    a("--heldout-max-windows", type=int, help="held-out perplexity: first N windows (default 0 = all)")
    a("--ppl-seqlen", type=int, default=2048, help="perplexity window length")
    a("--task-limit", type=int, help="botchan_cloze examples (default 40)")
    a("--task-methods", default="fp,rc+cgb", help="methods that also run the lm-eval task")
    a("--skip-tasks", action="store_true", help="no lm-eval task")
    a("--reference-methods", default="rc+cgb",
      help="families for table 1b, reference-equivalent vs arbq default one change at a time: rc+cgb (default), "
           "x+cgb, or none; each adds ≈4 binarize runs")
    a("--no-ablations", action="store_true",
      help="table 1b without the runs of options arbq does not use by default (rc+cgb: --true-sequential)")
    a("--reference-defaults", action="store_true",
      help="table 1b also runs the reference code's default configuration (magnitude salience; one more run)")
    a("--skip-quality", action="store_true", help="skip calibrate/binarize/eval/pack (tables 1-3)")
    a("--skip-kernels", action="store_true", help="skip kernel and decode timings (table 4)")
    a("--quick", action="store_true", help="tiny smoke-test configuration (numbers not meaningful)")
    a("--out", type=Path, default=REPO / "bench" / "out", help="work dir; finished runs there are reused")
    a("--results", type=Path, help="results JSON (default bench/results.json; with --quick OUT/results.json)")
    a("--device", default="cpu", help="cpu | cuda | cuda:N")
    a("--threads", type=int, help="torch / OpenMP threads (default: torch's default)")
    a("--shapes", help=f"kernel shapes N×K, comma list (default {SHAPES})")
    a("--kernel-repeats", type=int, help="kernel timing repeats (default 21)")
    a("--kernel-methods", default=KERNEL_METHODS, help="methods timed besides rc+cgb in table 4 (comma list; "
      "'' = none; N:M methods such as pbs2p-6of8 time their binary_nm layout, which stbllm shares; "
      "NAME/lut the binary_lut / binary_nm_lut layout of `arbq pack --interleave`)")
    a("--kernel-clock", choices=("wall", "thread"), default="wall", help="CPU kernel clock (thread needs 1 thread)")
    a("--new-tokens", type=int, help="decode: new tokens (default 32)")
    a("--decode-repeats", type=int, help="decode: runs per model (default 5)")
    a("--skip-e2e", action="store_true", help="skip the end-to-end table on the synthetic 4096-class model (table 5)")
    a("--e2e-layers", type=int, help="table 5: decoder layers of the synthetic Llama (default 2; quick 1)")
    a("--e2e-methods", default=",".join(E2E_METHODS),
      help="table 5: packed layouts (comma list; NAME/lut = NAME's layout interleaved: binary_lut, "
      "binary_nm_lut)")
    a("--e2e-packed-dtypes", default="fp32,bf16", help="table 5: dtypes the packed models are loaded in")
    a("--e2e-repeats", type=int, help="table 5: timed runs per variant (default 3)")
    a("--e2e-new-tokens", type=int, help="table 5: new tokens (default 16)")
    a("--e2e-prompt-tokens", type=int, help="table 5: prompt tokens (default 128)")
    args = p.parse_args(argv)
    base = {**DEFAULTS, **(QUICK if args.quick else {}), **(PAPER if args.paper else {})}
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.results = args.results or (args.out / "results.json" if args.quick else REPO / "bench" / "results.json")
    return args


def _csv(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


class Bench:
    """Holds the results dict, writes it after every step, and records (not raises) per-step errors."""

    def __init__(self, args: argparse.Namespace):
        from bench.machine import git_commit, machine
        from bench.methods import ALL_METHODS, METHODS
        from bench.pipeline import console

        self.a, self.console = args, console
        bad = [m for m in _csv(args.methods) + _csv(args.task_methods) if m not in ALL_METHODS]
        bad += [m for m in _csv(args.kernel_methods) if m.removesuffix("/lut") not in METHODS]   # binarized only
        if bad:
            sys.exit(f"error: unknown method(s) {', '.join(bad)}; choose from {', '.join(ALL_METHODS)}")
        git = git_commit()
        self.res: dict = {"schema": "arbq-bench/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "git_commit": git["commit"], "git_dirty": git["dirty"], "machine": machine(),
                          "config": self._config(), "timing": {}, "errors": {}, "notes": []}
        tag = f"cal{args.nsamples}x{args.seqlen}-seed{args.seed}" + ("-noseq" if args.no_sequential else "") + \
            ("-quick" if args.quick else "") + ("" if args.device == "cpu" else f"-{args.device.replace(':', '')}")
        self.work = args.out / tag

    def _config(self) -> dict:
        from arbq.stages.perplexity import PROTOCOL

        a = self.a
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        cfg.update(max_windows=a.max_windows or None, heldout_max_windows=a.heldout_max_windows or None,
                   ppl_protocol=PROTOCOL)
        return cfg

    def save(self) -> None:
        from arbq.fileio import write_json

        write_json(self.a.results, self.res)

    def step(self, where: str, fn, timing: str | None = None):
        """fn() with its error recorded under errors/WHERE; seconds added to timing/TIMING_s."""
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as e:  # one failed run must not lose the hour of work around it
            traceback.print_exc()
            self.res["errors"][where] = f"{type(e).__name__}: {e}"
            return None
        finally:
            if timing:
                tm = self.res["timing"]
                tm[f"{timing}_s"] = round(tm.get(f"{timing}_s", 0.0) + time.perf_counter() - t0, 2)
            self.save()


def quality(b: Bench, model: str, text: Path) -> None:
    """Tables 1-3: calibrate once, then per run binarize → pack → evaluate (all cached in b.work)."""
    from bench import methods as mt
    from bench import pipeline as pl
    from bench.quality import Evaluator, ppl_fields, task_fields

    a, res, work = b.a, b.res, b.work
    names, task_methods = _csv(a.methods), set(_csv(a.task_methods)) if not a.skip_tasks else set()
    texts = {"botchan": (str(text), "botchan.txt", a.max_windows or None),
             "heldout": (f"{text}@0.8:1", "botchan.txt@0.8:1", a.heldout_max_windows or None)}
    q, size, ref = res.setdefault("quality", {}), res.setdefault("size", {}), res.setdefault("reference", {})
    res.setdefault("binarize", {})

    def evaluate(path: Path, cache: Path, tasks: bool, only: tuple = ("botchan", "heldout")) -> dict:
        ev, row = Evaluator(path, cache, a.device), {"model": str(path)}
        for prefix in only:
            spec, label, mw = texts[prefix]
            row.update(ppl_fields(prefix, ev.perplexity(spec, a.ppl_seqlen, mw), label))
        if tasks:
            row.update(task_fields("botchan_cloze", ev.task(TASK, a.task_limit)))
        return row

    if mt.FP in names:
        b.step("quality/fp", lambda: q.__setitem__(mt.FP, evaluate(Path(model), a.out / "eval" / "fp.json",
                                                                   mt.FP in task_methods)), "eval")
    cal = b.step("calibrate", lambda: pl.calibrate(model, work, f"{text}@0:0.8", a.nsamples, a.seqlen, a.seed,
                                                   stats=a.no_sequential, device=a.device), "calibrate")
    if cal is None:
        return
    res["calibrate"] = cal
    extra = {**(mt.QUICK_OVERRIDES if a.quick else {}), **({"sequential": False} if a.no_sequential else {})}
    specs = {s.name: s for s in mt.main_runs(names, extra)}
    families = {f: mt.reference_runs(f, extra, a.reference_defaults, not a.no_ablations)
                for f in _csv(a.reference_methods) if f != "none"}
    for runs in families.values():
        specs.update({s.name: s for s in runs if s.name not in specs})
    ref_eval: dict = {}
    for name, spec in specs.items():
        cost = b.step(f"binarize/{name}", lambda s=spec: pl.binarize(s, model, work, Path(cal["dir"]), a.device,
                                                                       a.threads), "binarize")
        res["binarize"][name] = cost or {"error": res["errors"][f"binarize/{name}"]}
        if cost is None:
            continue
        fake, cache = pl.run_dir(work, name) / "model-fake", work / "eval" / f"{name}.json"
        b.step(f"size/{name}", lambda n=name: size.__setitem__(n, pl.pack(n, work)), "pack")
        if name not in names:  # reference block only: perplexities, no task
            b.step(f"reference/{name}", lambda n=name, f=fake, c=cache: ref_eval.__setitem__(n, evaluate(f, c, False)),
                   "eval")
            continue
        b.step(f"quality/{name}", lambda n=name, f=fake, c=cache: q.__setitem__(n, evaluate(f, c, n in task_methods)),
               "eval")
        if name == "rc+cgb" and name in size and name in q:  # the packed model must match model-fake
            b.step("quality/rc+cgb/packed", lambda: q["rc+cgb"].update(packed_heldout_ppl=evaluate(
                work / "packed" / "rc+cgb", work / "eval" / "rc+cgb-packed.json", False, ("heldout",))["heldout_ppl"]),
                "eval")
            # the cost of fp8 (e4m3, one fp32 factor per tensor) scales instead of the recipe's fp16
            b.step("size/rc+cgb-fp8", lambda: size.__setitem__("rc+cgb-fp8", pl.pack("rc+cgb", work, "fp8")), "pack")
            if "rc+cgb-fp8" in size:
                b.step("quality/rc+cgb/packed_fp8", lambda: q["rc+cgb"].update(packed_fp8_heldout_ppl=evaluate(
                    work / "packed" / "rc+cgb-fp8", work / "eval" / "rc+cgb-packed-fp8.json", False,
                    ("heldout",))["heldout_ppl"]), "eval")
    for runs in families.values():
        for s in runs:
            ev = q.get(s.name) if s.name in names else ref_eval.get(s.name)
            ppl = {k: v for k, v in (ev or {}).items() if k.startswith(("botchan_", "heldout_"))
                   and not k.startswith("botchan_cloze")}
            row = {"note": s.note, "recipe": s.config().to_dict(), **ppl}
            cost = res["binarize"].get(s.name, {})
            row.update(binarize_wall_s=cost.get("wall_s"), bits_per_weight=size.get(s.name, {}).get(
                "bits_per_weight"), status="error" if "error" in cost or not ev else "ok")
            ref[s.name] = row
        b.save()


def speed(b: Bench, model: str) -> None:
    """Table 4: kernel timings and end-to-end decode (packed rc+cgb from the work dir, if any)."""
    from arbq.fileio import read_json
    from bench import speed as sp

    a = b.a
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in _csv(a.shapes)]
    k = b.step("kernels", lambda: sp.kernels(shapes, a.device, repeats=a.kernel_repeats, warmup=a.warmup,
                                             cold=a.cold, clock=a.kernel_clock), "kernels")
    b.res["kernels"] = k or {"status": "error"}
    if k is not None:
        k["other_methods"] = []
        for m in _csv(a.kernel_methods):
            if m == "rc+cgb":  # already timed above
                continue
            o = b.step(f"kernels/{m}", lambda m=m: sp.kernels(
                shapes, a.device, repeats=a.kernel_repeats, warmup=a.warmup, cold=a.cold, clock=a.kernel_clock,
                label=m, **sp.kernel_layout(m)), "kernels")
            if o is not None:
                k[m] = {key: v for key, v in o.items() if key not in ("threads", "clock", "repeats", "warmup",
                                                                    "hot_chain", "device", "dense_dtype", "backend")}
                k["other_methods"].append(m)
    b.res["notes"].append("kernel rows time random bits in the layout of the named method (8% salient columns, fp16 "
                          "scales); their honest bits are those of the timed layer")
    packed = b.work / "packed" / "rc+cgb"
    if not (packed / "config.json").is_file():
        b.res["decode"] = {"status": f"skipped: no packed rc+cgb model in {packed}"}
        b.save()
        return
    d = b.step("decode", lambda: sp.decode(packed, Path(model), a.device, a.new_tokens, a.decode_repeats), "decode")
    if d is not None:
        size = b.work / "packed" / "rc+cgb.size.json"
        d["bits_per_weight"] = read_json(size)["binarized"]["bpw_honest"] if size.is_file() else None
    b.res["decode"] = d or {"status": "error"}
    b.save()


def e2e(b: Bench) -> None:
    """Table 5: bench.e2e.run_all (synthetic Llama built and packed once in OUT/e2e, one process per variant)."""
    from bench import e2e as ee

    a = b.a

    def progress(r: dict) -> None:
        b.res["e2e"] = r
        b.save()

    dims = E2E_QUICK_DIMS if a.quick else None
    r = b.step("e2e", lambda: ee.run_all(a.out / "e2e", a.e2e_layers, _csv(a.e2e_methods), _csv(a.e2e_packed_dtypes),
                                         a.e2e_prompt_tokens, a.e2e_new_tokens, a.e2e_repeats, a.threads, 0,
                                         dims, log=b.console.print, progress=progress), "e2e")
    b.res["e2e"] = r or {"status": "error"}
    for kind, v in (r or {}).get("variants", {}).items():
        if "error" in v:
            b.res["errors"][f"e2e/{kind}"] = v["error"]
    b.save()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # as the arbq CLI: no "Loading weights" bars
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    from rich.console import Console

    from arbq import fixtures
    from bench.report import render

    model, text = fixtures.model_dir(), fixtures.botchan_path()
    if not (model / "config.json").is_file() or not text.is_file():
        print(f"error: fixtures missing under {fixtures.cache_dir()}; run `make fixtures`", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    b = Bench(args)
    b.console.print(f"bench: work dir {b.work}, results → {args.results}")
    try:
        if not args.skip_quality:
            quality(b, str(model), text)
        if not args.skip_kernels:
            speed(b, str(model))
        if not args.skip_e2e:
            e2e(b)
    except KeyboardInterrupt:
        b.save()
        print(f"interrupted: partial results in {args.results}; run the same command again to resume "
              f"(finished runs in {b.work} are reused)", file=sys.stderr)
        return 130
    b.res["timing"]["total_s"] = round(time.perf_counter() - t0, 1)
    b.res["timing"]["loadavg_at_end"] = b.res["machine"]["loadavg_at_start"] and \
        [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    b.save()
    from bench.frontier import plot

    png = plot(b.res, args.results.with_name(args.results.stem + "-frontier.png"))
    if png:
        b.res.setdefault("notes", []).append(f"frontier plot → {png}")
    render(b.res, Console(width=max(Console().width, 160)))
    print(f"results → {args.results} ({b.res['timing']['total_s']:.0f} s)")
    return 1 if b.res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
