"""The size report of a packed model: honest bits per binarized weight, by component, two ways.

measured: every byte written for a linear (numel · element size · 8 per tensor), summed per component
formula:  the format's closed form (arbq.packed.format.formula_bits); the two must agree exactly
paper:    the papers' convention, sign bit + salient residual bit only
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table

from arbq.errors import ArbqError
from arbq.packed.format import COMPONENT_ORDER, LinearSpec, formula_bits, measured_bits, paper_bits


@dataclass
class SizeReport:
    """Accumulates per-linear bit counts; `to_dict` gives the JSON report."""

    linears: list[dict] = field(default_factory=list)
    measured: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENT_ORDER, 0))
    formula: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENT_ORDER, 0))
    weights: int = 0
    paper: int = 0

    def add(self, name: str, spec: LinearSpec, tensors: dict) -> None:
        """tensors: suffix -> tensor as written for this linear (bias included if any)."""
        got = measured_bits(tensors)
        bias = tensors.get("bias")
        want = formula_bits(spec, bias_bits=0 if bias is None else bias.numel() * bias.element_size() * 8)
        if got != want:
            raise ArbqError(f"{name}: bits written {got} disagree with the format's formula {want}")
        nk = spec.out_features * spec.in_features
        for c in COMPONENT_ORDER:
            self.measured[c] += got[c]
            self.formula[c] += want[c]
        self.weights += nk
        self.paper += paper_bits(spec)
        self.linears.append({"name": name, "out_features": spec.out_features, "in_features": spec.in_features,
                             "n_salient": spec.n_salient, "bpw_honest": sum(got.values()) / nk,
                             "bpw_paper": paper_bits(spec) / nk})

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
            },
            "model": {"params": model_params, "packed_bytes": packed_bytes, "fp16_bytes": 2 * model_params,
                      "bits_per_param": 8 * packed_bytes / max(model_params, 1),
                      "compression_vs_fp16": 2 * model_params / max(packed_bytes, 1)},
            "linears": self.linears,
        }


def report_table(rep: dict) -> Table:
    """A rich table of the report: components, totals, whole-model size."""
    b, m = rep["binarized"], rep["model"]
    t = Table(title=f"packed {rep.get('method')}{'+cgb' if rep.get('cgb') else ''}, scales {rep.get('scale_dtype')}: "
                    f"{b['linears']} binarized linears, {b['weights']:,} weights")
    t.add_column("component")
    t.add_column("bits / binarized weight", justify="right")
    for c in COMPONENT_ORDER:
        if b["bpw_measured"][c]:
            t.add_row(c.replace("_", " "), f"{b['bpw_measured'][c]:.4f}")
    t.add_row("[bold]honest total (every byte written)", f"[bold]{b['bpw_honest']:.4f}")
    t.add_row("paper convention (sign + residual bits)", f"{b['bpw_paper']:.4f}")
    t.add_row("whole model, bits / parameter", f"{m['bits_per_param']:.3f}")
    t.add_row("whole model size vs fp16", f"{m['packed_bytes'] / 2**20:,.1f} MiB vs {m['fp16_bytes'] / 2**20:,.1f} MiB "
                                         f"({m['compression_vs_fp16']:.2f}×)")
    return t
