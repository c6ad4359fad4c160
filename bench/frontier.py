"""The bits–quality frontier: every measured storage option as (honest bits per quantized weight, held-out
perplexity), one table and one plot (PNG, log perplexity vs bits, the FP model as a line).

Points come from the results dict only: each main run (`quality[name].heldout_ppl` with `size[name]`), the
packed fp8-scale variant of rc+cgb, and the reference block's runs that were packed. A point is on the
frontier (Pareto) if no other point has fewer or equal bits and a lower perplexity.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table


def points(res: dict) -> list[dict]:
    """[{name, bits, paper_bits, ppl, pareto}] sorted by bits."""
    q, size = res.get("quality", {}), res.get("size", {})
    out = []
    for name, r in q.items():
        s = size.get(name, {})
        if name != "fp" and "bits_per_weight" in s and r.get("heldout_ppl") is not None:
            out.append({"name": name, "bits": s["bits_per_weight"], "paper_bits": s["bits_per_weight_paper"],
                        "ppl": r["heldout_ppl"]})
        s8 = size.get(f"{name}-fp8", {})
        if r.get("packed_fp8_heldout_ppl") is not None and "bits_per_weight" in s8:
            out.append({"name": f"{name} (fp8 scales)", "bits": s8["bits_per_weight"],
                        "paper_bits": s8["bits_per_weight_paper"], "ppl": r["packed_fp8_heldout_ppl"]})
    for name, r in res.get("reference", {}).items():
        if name not in q and r.get("bits_per_weight") is not None and r.get("heldout_ppl") is not None:
            out.append({"name": name, "bits": r["bits_per_weight"], "paper_bits": None, "ppl": r["heldout_ppl"]})
    out.sort(key=lambda p: (p["bits"], p["ppl"]))
    for p in out:
        p["pareto"] = not any(o is not p and o["bits"] <= p["bits"] and o["ppl"] < p["ppl"] for o in out)
    return out


def fp_ppl(res: dict) -> float | None:
    return res.get("quality", {}).get("fp", {}).get("heldout_ppl")


def frontier_table(res: dict) -> Table:
    cfg = res["config"]
    t = Table(title=f"5. Bits–quality frontier — honest bits per quantized weight (every byte written) vs held-out "
                    f"perplexity (botchan.txt@0.8:1, {cfg['ppl_protocol']}, seqlen {cfg['ppl_seqlen']}); FP "
                    f"{fp_ppl(res) or float('nan'):.2f}; * = on the frontier")
    for c in ("method / option", "bits/w honest", "bits/w paper", "held-out ppl", "× FP", ""):
        t.add_column(c, justify="left" if c == "method / option" else "right")
    fp = fp_ppl(res)
    for p in points(res):
        t.add_row(p["name"], f"{p['bits']:.3f}", "—" if p["paper_bits"] is None else f"{p['paper_bits']:.3f}",
                  f"{p['ppl']:,.2f}", "—" if fp is None else f"{p['ppl'] / fp:,.1f}", "*" if p["pareto"] else "")
    return t


LABEL_ALL = 12


def plot(res: dict, path: Path) -> Path | None:
    """Write the frontier PNG to `path`; None when matplotlib is missing or there is nothing to plot."""
    pts = points(res)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for p in pts:
        ax.scatter(p["bits"], p["ppl"], color="tab:red" if p["name"].startswith("gptq") else "tab:blue",
                   marker="o" if p["pareto"] else "x", zorder=3)
    named = [p for p in pts if p["pareto"] or len(pts) <= LABEL_ALL]   # crowded: the frontier only (the table has all)
    front = [p for p in pts if p["pareto"]]
    ax.plot([p["bits"] for p in front], [p["ppl"] for p in front], color="gray", lw=1, ls="--", zorder=2)
    if fp_ppl(res):
        ax.axhline(fp_ppl(res), color="black", lw=1, label=f"FP32 ({fp_ppl(res):.2f})")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("honest bits per quantized weight (every byte written)")
    ax.set_ylabel("held-out perplexity (log)")
    cfg = res["config"]
    ax.set_title(f"SmolLM2-135M, botchan.txt@0.8:1, seqlen {cfg['ppl_seqlen']}; blue: binary methods, red: GPTQ",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _place_labels(fig, ax, named)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# label offsets in points, tried in order: right, then below, above, left and further out
OFFSETS = [(5, 3), (5, -10), (5, 10), (-5, 3), (-5, -10), (5, -20), (5, 20), (-5, 16), (-5, -22)]


def _place_labels(fig, ax, named: list[dict]) -> None:
    """Annotate each point with its name at the first offset whose text box overlaps no label placed
    before it (nor leaves the axes); the last offset tried stays if none is free."""
    renderer = fig.canvas.get_renderer()
    frame, boxes = ax.get_window_extent(renderer), []
    for p in named:
        for dx, dy in OFFSETS:
            t = ax.annotate(p["name"], (p["bits"], p["ppl"]), fontsize=7, xytext=(dx, dy), textcoords="offset points",
                            ha="left" if dx > 0 else "right", va="center",
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray", "shrinkA": 0, "shrinkB": 3})
            box = t.get_window_extent(renderer).expanded(1.02, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(b) for b in boxes):
                break
            if (dx, dy) != OFFSETS[-1]:
                t.remove()
        boxes.append(box)


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.frontier RESULTS.json [--png PATH]`: print table 5 and write the plot of a results file
    (bench/out/results.json, or any file with the same `config`, `quality` and `size` keys)."""
    import argparse
    import json

    from rich.console import Console

    p = argparse.ArgumentParser(prog="python -m bench.frontier", description=main.__doc__.split("\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--png", type=Path, help="plot path (default: RESULTS with -frontier.png)")
    args = p.parse_args(argv)
    try:
        res = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {args.results}: {e}") from None
    Console().print(frontier_table(res))
    png = plot(res, args.png or args.results.with_name(args.results.stem + "-frontier.png"))
    print(f"plot → {png}" if png else "no plot (matplotlib missing or no points)")


if __name__ == "__main__":
    main()
