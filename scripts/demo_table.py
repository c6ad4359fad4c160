"""Print the demo's summary table from the JSON files `scripts/demo.sh` wrote."""

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main(out: Path) -> None:
    table = Table(title="arbq demo: SmolLM2-135M, rc + cgb, held-out botchan.txt[80%:100%]")
    for col in ("model", "text", "protocol", "seqlen", "perplexity", "size on disk"):
        table.add_column(col)
    sizes = json.loads((out / "size.json").read_text())
    fp16_mb = sizes["model"]["fp16_bytes"] / 2**20
    for name, size in (("fp", f"{fp16_mb:.0f} MB as fp16"), ("fake", "(fake-quant fp32)"),
                       ("packed", f"{dir_mb(out / 'rc-cgb-packed'):.0f} MB")):
        res = json.loads((out / f"eval-{name}.json").read_text())
        for row in res["perplexity"]:
            table.add_row(name, Path(row["text"]).name, row["protocol"], str(row["seqlen"]), f"{row['ppl']:.2f}", size)
    Console().print(table)
    b = sizes["binarized"]
    print(f"bits per binarized weight: {b['bpw_honest']:.3f} honest (every byte stored), "
          f"{b['bpw_paper']:.3f} in the papers' convention (sign + residual bits)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
