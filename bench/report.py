"""Rich tables drawn only from the results dict, so every printed figure is also in results.json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _f(v, fmt: str = ".2f", none: str = "—") -> str:
    return none if v is None else format(v, fmt)


def _ppl_header(q: dict, prefix: str) -> str:
    r = next((v for v in q.values() if isinstance(v, dict) and f"{prefix}_ppl" in v), None)
    if r is None:
        return f"{prefix} ppl"
    return (f"{r[f'{prefix}_text']} ppl\n{r[f'{prefix}_windows']} of {r[f'{prefix}_windows_total']} windows "
            f"× {r[f'{prefix}_seqlen']}")


def quality_table(res: dict) -> Table:
    q, size, cfg = res.get("quality", {}), res.get("size", {}), res["config"]
    cal = res.get("calibrate", {}).get("params", {})
    mw = cfg["max_windows"]
    cut = (f"botchan.txt: first {mw} windows only (--max-windows {mw}; the default 8 keeps `make bench` within 60 min "
           "on 2 cores; --max-windows 0 = all)" if mw else "botchan.txt: all windows")
    t = Table(title=f"1. Quality — perplexity, protocol: {cfg['ppl_protocol']}, seqlen {cfg['ppl_seqlen']}, "
                    f"binarized methods evaluated as RUN/model-fake (dequantized, fp32)\n{cut}; botchan.txt includes "
                    f"the calibration text, botchan.txt@0.8:1 is held out. Calibration: {cal.get('nsamples')} × "
                    f"{cal.get('seqlen')} tokens of {cal.get('data', '?').rsplit('/', 1)[-1]}, seed "
                    f"{cal.get('seed')}, the same samples for every method" + (" — QUICK SMOKE TEST, numbers not "
                                                                                "meaningful" if cfg["quick"] else ""))
    t.add_column("method")
    t.add_column(_ppl_header(q, "botchan"), justify="right")
    t.add_column(_ppl_header(q, "heldout"), justify="right")
    t.add_column(f"botchan_cloze acc (lm-eval, 0-shot, limit {cfg['task_limit']})", justify="right")
    t.add_column("bits / binarized weight\nhonest (paper)", justify="right")
    for m, r in q.items():
        err = f" ± {r['botchan_cloze_acc_stderr']:.3f}" if r.get("botchan_cloze_acc_stderr") is not None else ""
        acc = f"{r['botchan_cloze_acc']:.3f}{err} (n={r['botchan_cloze_n']})" if "botchan_cloze_acc" in r else "—"
        s = size.get(m, {})
        bits = "32 (fp32)" if m == "fp" else (f"{s['bits_per_weight']:.3f} ({s['bits_per_weight_paper']:.3f})"
                                              if "bits_per_weight" in s else "—")
        t.add_row(m, _f(r.get("botchan_ppl")), _f(r.get("heldout_ppl")), acc, bits)
        if "packed_heldout_ppl" in r:
            t.add_row(f"{m} (packed, from the bits)", "", _f(r["packed_heldout_ppl"]), "", "")
        if "packed_fp8_heldout_ppl" in r:
            s8 = size.get(f"{m}-fp8", {})
            bits8 = f"{s8['bits_per_weight']:.3f} ({s8['bits_per_weight_paper']:.3f})" if s8 else "—"
            t.add_row(f"{m} (packed, fp8 scales)", "", _f(r["packed_fp8_heldout_ppl"]), "", bits8)
        if "error" in r:
            t.add_row(f"{m}: [red]{r['error']}", "", "", "", "")
    return t


def reference_table(res: dict) -> Table:
    t = Table(title="1b. Reference-equivalent (recipes/reference-*.yaml) vs arbq default, one change at a time "
                    f"(same calibration; ppl: {res['config']['ppl_protocol']}, seqlen {res['config']['ppl_seqlen']})")
    for col in ("run", "recipe vs default", "held-out ppl", "botchan ppl", "binarize wall s", "bits/w honest",
                "status"):
        t.add_column(col, justify="left" if col in ("run", "recipe vs default", "status") else "right")
    for name, r in res.get("reference", {}).items():
        t.add_row(name, r.get("note", ""), _f(r.get("heldout_ppl")), _f(r.get("botchan_ppl")),
                  _f(r.get("binarize_wall_s"), ".0f"), _f(r.get("bits_per_weight"), ".3f"), r.get("status", ""))
    return t


def binarize_table(res: dict) -> Table:
    gpu = any(r.get("peak_gpu_mb") is not None for r in res.get("binarize", {}).values())
    cal = res.get("calibrate", {})
    t = Table(title=f"2. Binarize cost — one `arbq binarize` subprocess per method (bench.measure), "
                    f"{res['machine']['torch_threads']} threads, device {res['config']['device']}; the shared "
                    f"calibration took {_f(cal.get('wall_s'), '.1f')} s{' (reused)' if cal.get('reused') else ''}")
    cols = ["method", "wall s", "peak RSS MB", "fit s / layer\n(report.jsonl)", "layers"] + \
        (["peak GPU MB"] if gpu else []) + ["note"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("method", "note") else "right")
    for name, r in res.get("binarize", {}).items():
        note = r.get("error") or ("resumed: wall covers the rest only" if r.get("resumed") else
                                  "reused from an earlier bench" if r.get("reused") else "")
        row = [name, _f(r.get("wall_s"), ".1f"), _f(r.get("peak_rss_mb"), ".0f"), _f(r.get("layer_avg_s"), ".2f"),
               str(r.get("layers", "—"))] + ([_f(r.get("peak_gpu_mb"), ".0f")] if gpu else []) + [note]
        t.add_row(*row)
    return t


def size_table(res: dict) -> Table:
    t = Table(title="3. Size — `arbq pack` (fp16 scales, fp16 unbinarized weights); honest = every byte written "
                    "for the binarized linears × 8 / weights, paper = sign + salient residual bits only")
    for c in ("method", "bits/w honest", "bits/w paper", "model bits/param", "packed weights MB",
              "packed dir MB", "fp16 original MB", "× smaller than fp16"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for name, s in res.get("size", {}).items():
        if "error" in s:
            t.add_row(name, f"[red]{s['error']}", *[""] * 6)
            continue
        t.add_row(name, f"{s['bits_per_weight']:.3f}", f"{s['bits_per_weight_paper']:.3f}",
                  f"{s['model_bits_per_param']:.2f}", f"{s['packed_weights_mb']:.1f}", f"{s['packed_dir_mb']:.1f}",
                  f"{s['fp16_mb']:.1f}", f"{s['compression_vs_fp16']:.2f}")
    return t


def kernel_table(res: dict, method: str | None = None) -> Table:
    """Table 4 for the kernels' main method (kernels/NxK/...) or another one (kernels/METHOD/NxK/...)."""
    k = res["kernels"] if method is None else {**res["kernels"], **res["kernels"][method]}
    layout = f" (binary_nm {k['nm']})" if k.get("nm") else ""
    chain = (f"batch 1: per call in a chain of back-to-back calls (cold: every copy once; hot: {k['hot_chain']}), as "
             "in a decode; ") if k.get("hot_chain") else ""
    t = Table(title=f"4. Kernels — {k['method']}{layout} packed BinaryLinear ({k['backend']}) vs dense "
                    f"{k['dense_dtype']} matmul, {k['threads']} threads, median (p10–p90) of {k['repeats']} "
                    f"A/B-interleaved repeats, "
                    f"clock {k['clock']}; hot = same weights every call, cold = rotating copies > LLC; {chain}"
                    "bf16 x = the packed layer fed bf16 activations (batch ≥ 8: bf16 panels, bf16 matmul)")
    for c in ("shape N×K", "bits/w honest", "ceiling 32/b", "batch", "dense ms", "packed ms", "speedup",
              "cold speedup", "dense bf16 ms", "packed, bf16 x, ms", "vs bf16", "bf16 x vs fp32"):
        t.add_column(c, justify="left" if c == "shape N×K" else "right")
    for shape, row in k.items():
        if not isinstance(row, dict) or "bits_per_weight" not in row:
            continue
        for b, r in ((b, r) for b, r in row.items() if b.startswith("batch")):
            cold = r.get("cold", {}).get("speedup_vs_dense")
            t.add_row(shape, f"{row['bits_per_weight']:.3f}", f"{row['ceiling_vs_fp32']:.1f}×", b.removeprefix("batch"),
                      f"{r['dense_median_ms']:.3f} ({r['dense_p10_ms']:.3f}–{r['dense_p90_ms']:.3f})",
                      f"{r['packed_median_ms']:.3f} ({r['packed_p10_ms']:.3f}–{r['packed_p90_ms']:.3f})",
                      f"{r['speedup_vs_dense']:.2f}×", _f(cold, ".2f") + ("×" if cold else ""),
                      _f(r.get("dense_bf16_median_ms"), ".3f"), _f(r.get("packed_bf16_median_ms"), ".3f"),
                      _f(r.get("speedup_vs_bf16"), ".2f") + ("×" if r.get("speedup_vs_bf16") else ""),
                      _f(r.get("packed_bf16_vs_fp32"), ".2f") + ("×" if r.get("packed_bf16_vs_fp32") else ""))
    return t


def decode_table(res: dict) -> Table:
    d = res["decode"]
    t = Table(title=f"4b. End-to-end greedy decode — {d['new_tokens']} new tokens after a {d['prompt_tokens']}-token "
                    f"prompt, KV cache on, median of {d['repeats']} A/B-interleaved runs, {d['threads']} threads")
    for c in ("model", "bits/w honest", "prefill ms", "decode tokens/s", "speedup"):
        t.add_column(c, justify="left" if c == "model" else "right")
    bits = res.get("size", {}).get("rc+cgb", {}).get("bits_per_weight")
    t.add_row(f"dense {d['dense_dtype']}", "32" if d["dense_dtype"] == "float32" else "16",
              f"{d['dense_prefill_ms']:.1f}", f"{d['dense_tokens_per_s']:.1f}", "1.00×")
    t.add_row("packed rc+cgb (arbq.packed.load)", _f(bits, ".3f"), f"{d['packed_prefill_ms']:.1f}",
              f"{d['packed_tokens_per_s']:.1f}", f"{d['speedup_vs_dense']:.2f}×")
    return t


def render(res: dict, console: Console) -> None:
    """Print every table for which results exist, plus the machine line and any errors."""
    m = res["machine"]
    console.print(f"[bold]arbq bench[/] — {m['cpu_model']}, {m['cpu_cores']} cores, torch {m['torch']} "
                  f"({m['torch_threads']} threads), GPU: {(m['gpu'] or {}).get('name', 'none')}, "
                  f"git {str(res.get('git_commit'))[:12]}{' (dirty)' if res.get('git_dirty') else ''}")
    if res.get("quality"):
        console.print(quality_table(res))
    if res.get("reference"):
        console.print(reference_table(res))
    if res.get("binarize"):
        console.print(binarize_table(res))
    if res.get("size"):
        console.print(size_table(res))
    if res.get("quality"):
        from bench.frontier import frontier_table

        console.print(frontier_table(res))
    if isinstance(res.get("kernels"), dict) and "method" in res["kernels"]:
        console.print(kernel_table(res))
        for other in res["kernels"].get("other_methods", []):
            if isinstance(res["kernels"].get(other), dict):
                console.print(kernel_table(res, other))
    if isinstance(res.get("decode"), dict) and "speedup_vs_dense" in res["decode"]:
        console.print(decode_table(res))
    if isinstance(res.get("e2e"), dict) and res["e2e"].get("variants"):
        from bench.e2e import e2e_table

        console.print(e2e_table(res["e2e"]))
    for key in ("kernels", "decode", "e2e"):
        if isinstance(res.get(key), dict) and "status" in res[key]:
            console.print(f"{key}: {res[key]['status']}")
    for where, msg in res.get("errors", {}).items():
        console.print(f"[red]error in {where}: {msg}")
    for note in res.get("notes", []):
        console.print(f"note: {note}")
