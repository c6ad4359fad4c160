"""The size report of a packed model: honest bits per quantized weight, by component, two ways.

measured: every byte written for a linear (numel · element size · 8 per tensor), summed per component
formula:  the layout's closed form (spec.formula_bits, arbq.packed.layouts); the two must agree exactly
paper:    the papers' convention (binary: sign bit + salient residual bit only; uniform: the code bits)
Components are the layouts' own (binary: sign, group_bit, ...; uniform: codes, zero_points, scales), in
order of first appearance; `by_method` splits the totals by the method label of each module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

from arbq.errors import ArbqError
from arbq.packed.format import measured_bits


@dataclass
class SizeReport:
    """Accumulates per-linear bit counts; `to_dict` gives the JSON report."""

    linears: list[dict] = field(default_factory=list)
    measured: dict[str, int] = field(default_factory=dict)
    formula: dict[str, int] = field(default_factory=dict)
    by_method: dict[str, dict[str, int]] = field(default_factory=dict)
    weights: int = 0
    paper: int = 0

    def add(self, name: str, spec, tensors: dict, method: str = "") -> None:
        """spec: the layout's spec; tensors: suffix -> tensor as written for this linear (bias included if any)."""
        got = measured_bits(tensors, spec)
        bias = tensors.get("bias")
        want = spec.formula_bits(bias_bits=0 if bias is None else bias.numel() * bias.element_size() * 8)
        if got != want:
            raise ArbqError(f"{name}: bits written {got} disagree with the layout's formula {want}")
        nk, paper = spec.out_features * spec.in_features, spec.paper_bits()
        for c in want:
            self.measured[c] = self.measured.get(c, 0) + got[c]
            self.formula[c] = self.formula.get(c, 0) + want[c]
        self.weights += nk
        self.paper += paper
        m = self.by_method.setdefault(method, {"linears": 0, "weights": 0, "bits": 0, "paper_bits": 0})
        m["linears"] += 1
        m["weights"] += nk
        m["bits"] += sum(got.values())
        m["paper_bits"] += paper
        self.linears.append({"name": name, "method": method, "layout": spec.layout, "out_features": spec.out_features,
                             "in_features": spec.in_features, "n_salient": getattr(spec, "n_salient", None),
                             "bpw_honest": sum(got.values()) / nk, "bpw_paper": paper / nk})

    def to_dict(self, model_params: int, packed_bytes: int, **meta) -> dict:
        n = max(self.weights, 1)
        honest = sum(self.measured.values()) / n
        return {
            **meta,
            "binarized": {
                "linears": len(self.linears), "weights": self.weights,
                "bpw_measured": {c: b / n for c, b in self.measured.items()},
                "bpw_formula": {c: b / n for c, b in self.formula.items()},
                "measured_equals_formula": self.measured == self.formula,
                "bpw_honest": honest, "bpw_paper": self.paper / n,
                "by_method": {k: {"linears": v["linears"], "weights": v["weights"],
                                  "bpw_honest": v["bits"] / v["weights"], "bpw_paper": v["paper_bits"] / v["weights"]}
                              for k, v in self.by_method.items()},
            },
            "model": {"params": model_params, "packed_bytes": packed_bytes, "fp16_bytes": 2 * model_params,
                      "bits_per_param": 8 * packed_bytes / max(model_params, 1),
                      "compression_vs_fp16": 2 * model_params / max(packed_bytes, 1)},
            "linears": self.linears,
        }


def report_table(rep: dict) -> Table:
    """A rich table of the report: components, totals, whole-model size."""
    b, m = rep["binarized"], rep["model"]
    t = Table(title=f"packed {', '.join(b.get('by_method') or [rep.get('method', '?')])}, scales "
                    f"{rep.get('scale_dtype')}: {b['linears']} quantized linears, {b['weights']:,} weights")
    t.add_column("component")
    t.add_column("bits / quantized weight", justify="right")
    for c, v in b["bpw_measured"].items():
        if v:
            t.add_row(c.replace("_", " "), f"{v:.4f}")
    if len(b.get("by_method") or {}) > 1:
        for k, v in b["by_method"].items():
            t.add_row(f"  {k}: {v['linears']} linears", f"{v['bpw_honest']:.4f}")
    t.add_row("[bold]honest total (every byte written)", f"[bold]{b['bpw_honest']:.4f}")
    t.add_row("paper convention (code bits; pruned layouts: × kept share, no positions)", f"{b['bpw_paper']:.4f}")
    t.add_row("whole model, bits / parameter", f"{m['bits_per_param']:.3f}")
    t.add_row("whole model size vs fp16", f"{m['packed_bytes'] / 2**20:,.1f} MiB vs {m['fp16_bytes'] / 2**20:,.1f} MiB "
                                         f"({m['compression_vs_fp16']:.2f}×)")
    return t
