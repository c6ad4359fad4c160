"""`arbq` command line: parse flags, call a stage, print. No algorithm or file logic lives here."""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import typer

from arbq.errors import ArbqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Binary (1-bit) post-training quantization of LLMs: calibrate → binarize → pack → eval.")


OFFLOAD_HELP = "Calibration activations between layers: device | cpu | disk (a scratch file under the output dir)."
LAZY_HELP = "Read one decoder layer at a time from safetensors (other formats: full load)."
# arbq.methods.registry's keys, spelled out so that `--help` does not import torch (a test keeps them equal)
METHOD_NAMES = ("rc", "x", "arb", "billm", "sign", "gptq", "pbs2p", "stbllm")


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="Local HF dir, hub id, or .gguf file."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory."),
    data: str = typer.Option("wikitext2", help="wikitext2 | c4 | ptb | PATH.txt | PATH.jsonl (PATH@A:B slices)."),
    nsamples: int = typer.Option(128, min=1, help="Number of calibration windows."),
    seqlen: int = typer.Option(2048, min=2, help="Tokens per window."),
    seed: int = typer.Option(0, help="Sampling seed."),
    stats: bool = typer.Option(True, help="Also write per-layer full-precision Hessians."),
    resume: bool = typer.Option(False, help="Continue at the first missing layer."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
    offload_activations: str = typer.Option("cpu", help=OFFLOAD_HELP),
    hessian_dtype: str = typer.Option("float32", help="Hessian accumulation dtype: float32 | float64."),
    lazy: bool = typer.Option(True, help=LAZY_HELP),
) -> None:
    """Sample calibration windows and write per-layer Hessian statistics."""
    from arbq.stages.calibrate import run_calibrate

    run_calibrate(model, out, data=data, nsamples=nsamples, seqlen=seqlen, seed=seed, stats=stats, resume=resume,
                  device=device, offload=offload_activations, hessian_dtype=hessian_dtype, lazy=lazy)


@app.command()
def binarize(
    model: str = typer.Argument(..., help="Local HF dir, hub id, or .gguf file."),
    out: Path = typer.Option(..., "-o", "--out", help="Run directory."),
    method: str = typer.Option(None, help=" | ".join(METHOD_NAMES) + " (arbq.methods.registry; default from the "
                                                                     "recipe: rc)."),
    cgb: bool = typer.Option(None, "--cgb/--no-cgb", help="Column-group bitmap for salient columns."),
    recipe: str = typer.Option(None, help="Recipe YAML path or name under recipes/ (flags override it)."),
    calib: Path = typer.Option(None, help="Directory written by `arbq calibrate` (else run it into RUN/calib)."),
    data: str = typer.Option("wikitext2", help="Calibration data when --calib is not given."),
    nsamples: int = typer.Option(128, min=1, help="Calibration windows when --calib is not given."),
    seqlen: int = typer.Option(2048, min=2, help="Calibration window length when --calib is not given."),
    seed: int = typer.Option(0, help="Calibration sampling seed."),
    iters: int = typer.Option(None, help="ARB refinement iterations."),
    x_iters: int = typer.Option(None, help="ARB-X calibration-aware iterations."),
    search_iters: int = typer.Option(None, help="Refinement iterations inside the mask search."),
    search_fit: str = typer.Option(None, help="Mask scoring: plain (closed form, fast) | method (own binarizers)."),
    split_error: str = typer.Option(None, help="Non-salient split scored by: weight | output error."),
    blocksize: int = typer.Option(None, help="Columns per block."),
    compensation: str = typer.Option(None, help="Binary methods' block error compensation: exact (default) | "
                                                "diagonal (the reference code's)."),
    polish: int = typer.Option(None, help="Binary methods with a Hessian, pbs2p, stbllm: rounds of GPTQ-style codes "
                                          "and least-squares scales per block against its exact loss (0 = off)."),
    bits: int = typer.Option(None, help="gptq: bits per code (2 | 3 | 4 | 8)."),
    group: int = typer.Option(None, help="gptq: columns per scale and zero point."),
    act_order: bool = typer.Option(None, "--act-order/--no-act-order",
                                   help="gptq: columns by decreasing Hessian diagonal (default) or left to right."),
    keep_columns: float = typer.Option(None, help="gptq: fraction of input columns kept in fp16 (OWQ), e.g. 0.005."),
    nm: str = typer.Option(None, help="pbs2p / stbllm: keep N of every M input columns, e.g. 6:8."),
    nm_metric: str = typer.Option(None, help="pbs2p / stbllm pruning score: hessian | wanda."),
    nm_cfs: int = typer.Option(None, help="pbs2p / stbllm: per-layer N within ±this of the target by layer "
                                          "influence (CFS; 0 = off)."),
    percdamp: float = typer.Option(None, help="Hessian damping fraction."),
    tune_epochs: int = typer.Option(None, help="Block-wise reconstruction: Adam passes over the calibration "
                                               "samples tuning each layer's scales to its FP output (0 = off)."),
    tune_lr: float = typer.Option(None, help="Reconstruction step size (relative; default 1e-3)."),
    tune_target: str = typer.Option(None, help="Reconstruction target: layer (the FP layer on the same inputs) | "
                                               "model (the FP model's outputs of that layer)."),
    salient: str = typer.Option(None, help="Salience metric: hessian | magnitude."),
    search_on: str = typer.Option(None, help="Mask search errors on: weight (W) | salience (the reference's)."),
    split_quantiles: str = typer.Option(None, help="Split thresholds: members | with_zeros (the reference's)."),
    sequential: bool = typer.Option(None, "--sequential/--no-sequential",
                                    help="Inputs through already-binarized layers (default) or stored FP stats."),
    true_sequential: bool = typer.Option(None, "--true-sequential/--no-true-sequential",
                                         help="Per-group Hessians inside a layer."),
    layers: str = typer.Option(None, help="Only layers A:B (a shard of the job)."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
    resume: bool = typer.Option(False, help="Continue at the first layer without a complete file."),
    offload_activations: str = typer.Option("cpu", help=OFFLOAD_HELP),
    hessian_dtype: str = typer.Option(None, help="Hessian accumulation dtype: float32 (default) | float64; "
                                                 "with --no-sequential the calibration's."),
    lazy: bool = typer.Option(True, help=LAZY_HELP),
) -> None:
    """Binarize every decoder layer's linears; writes per-layer results, report.jsonl and model-fake/."""
    from arbq.methods.config import load_recipe
    from arbq.stages.binarize import run_binarize

    cfg = load_recipe(recipe).with_flags(
        method=method, cgb=cgb, iters=iters, x_iters=x_iters, search_iters=search_iters, search_fit=search_fit,
        split_error=split_error, bits=bits, group=group, act_order=act_order, keep_columns=keep_columns,
        nm=nm, nm_metric=nm_metric, nm_cfs=nm_cfs, blocksize=blocksize, compensation=compensation,
        polish=polish, percdamp=percdamp, salient=salient,
        tune_epochs=tune_epochs, tune_lr=tune_lr, tune_target=tune_target,
        search_on=search_on, split_quantiles=split_quantiles, sequential=sequential, true_sequential=true_sequential)
    run_binarize(model, out, cfg, calib=calib, data=data, nsamples=nsamples, seqlen=seqlen, seed=seed,
                 layers=layers, device=device, resume=resume, offload=offload_activations,
                 hessian_dtype=hessian_dtype, lazy=lazy)


@app.command()
def pack(
    runs: list[Path] = typer.Argument(..., help="One or more run directories written by `arbq binarize`."),
    out: Path = typer.Option(..., "-o", "--out", help="Packed model directory."),
    dtype: str = typer.Option("fp16", help="Dtype of unbinarized weights: fp16 | bf16 | fp32."),
    scale_dtype: str = typer.Option(None, help="Dtype of scales and means: fp16 | bf16 | fp8 (default: the "
                                                "recipe's scale_dtype, fp16, which the fit was rounded to)."),
    json_out: Path = typer.Option(None, "--json", help="Write the size report as JSON."),
    interleave: bool = typer.Option(False, help="Write grouped binary layers (billm, x, rc, ± cgb) in the CPU "
                                                "lookup kernel's own layout (binary_lut: the same bits, 16 rows "
                                                "interleaved) and N:M layers with column scales (pbs2p, stbllm) in "
                                                "binary_nm_lut (expanded codes: 3 bits per weight for signs, groups "
                                                "and positions, vs 1 + 2n/m): no run-time copy, resident memory ≈ "
                                                "the file. GPUs run them through the torch backend."),
) -> None:
    """Write real 1-bit safetensors plus a config that says how to read them."""
    from arbq.stages.pack import run_pack

    run_pack(runs, out, dtype=dtype, scale_dtype=scale_dtype, json_out=json_out, interleave=interleave)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="HF dir, hub id, .gguf, RUN/model-fake or a packed dir."),
    ppl: str = typer.Option(None, help="Comma list of texts: wikitext2,c4,ptb,PATH.txt (PATH@A:B); default "
                                       "wikitext2 unless --tasks is given."),
    tasks: str = typer.Option(None, help="Comma list of lm-eval tasks or task YAML files."),
    include_path: Path = typer.Option(None, help="Extra lm-eval task directory."),
    seqlen: int = typer.Option(2048, min=2, help="Perplexity window length."),
    max_windows: int = typer.Option(None, help="Evaluate only the first N windows of each text."),
    limit: int = typer.Option(None, help="lm-eval: examples per task."),
    batch_size: int = typer.Option(1, help="lm-eval batch size."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
    resident: bool = typer.Option(True, "--resident/--no-resident",
                                  help="Packed model on the CPU: hold each linear in the kernel's own layout (one "
                                       "copy; bf16 prefill ≈ 6–9% slower) or as stored (+ the kernel's copy)."),
    json_out: Path = typer.Option(None, "--json", help="Write results as JSON."),
) -> None:
    """Perplexity (GPTQ protocol: non-overlapping windows) and zero-shot tasks via lm-eval."""
    from arbq.stages.evaluate import run_eval

    texts = _csv(ppl) if ppl is not None or tasks else ["wikitext2"]   # --tasks alone: only the tasks
    run_eval(model, ppl=texts, tasks=_csv(tasks), include_path=include_path, seqlen=seqlen,
             max_windows=max_windows, limit=limit, batch_size=batch_size, device=device, json_out=json_out,
             resident=resident)


@app.command()
def generate(
    model: str = typer.Argument(..., help="A packed dir, HF dir or RUN/model-fake."),
    prompt: str = typer.Argument(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(32, min=1),
) -> None:
    """Greedy generation, e.g. to try a packed model."""
    from arbq.stages.generate import run_generate

    typer.echo(run_generate(model, prompt, max_new_tokens=max_new_tokens))


class Interrupted(BaseException):
    """SIGINT or SIGTERM (what a preempted Slurm job gets) arrived. A BaseException, like
    KeyboardInterrupt, so every `finally` cleans up on the way out; not a KeyboardInterrupt, which
    click would turn into "Aborted!" and exit 1."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# signals received: a C extension that the handler's exception interrupts may replace it with its own error
# (safetensors' get_tensor turns it into a ValueError), so main() asks this list, not only the exception's type
SIGNALLED: list[int] = []


def _on_signal(signum: int, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)    # a second signal must not interrupt the cleanup
    SIGNALLED.append(signum)
    raise Interrupted(signum)


def _exit_interrupted(signum: int) -> None:
    print(f"interrupted by {signal.Signals(signum).name} (rerun with --resume to continue)", file=sys.stderr)
    sys.exit(128 + signum)


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST,
                errno.ENOTDIR, errno.EISDIR, errno.EFBIG, errno.EIO}


def _io_error(e: BaseException) -> str | None:
    """The one-line message for an OS or safetensors error that escaped the stages' own checks (e.g. a
    full disk inside transformers' save_pretrained), or None for an unexpected error (a bug: traceback)."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    if type(e).__name__ == "SafetensorError":
        return str(e).strip().splitlines()[0] if str(e).strip() else "safetensors error"
    return None


def main() -> None:
    # arbq draws its own rich progress; silence transformers' bars and advisory warnings
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    SIGNALLED.clear()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    try:
        app()
    except (Interrupted, KeyboardInterrupt) as e:
        _exit_interrupted(getattr(e, "signum", signal.SIGINT))
    except Exception as e:
        if SIGNALLED:                        # the signal's exception came back as another error
            _exit_interrupted(SIGNALLED[0])
        if isinstance(e, ArbqError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        msg = _io_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
