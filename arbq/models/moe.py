"""Mixture-of-experts decoder layers whose experts are fused in 3-D parameters (transformers ≥ 5: Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE): one expert's projection as a 2-D [out, in] linear, per-expert Hessians
from the tokens the router sends to each expert, and an unfused experts module that runs per-expert
linears (nn.Linear or packed ones) with the model's own routing.

Layout of an experts module (X experts, hidden D, expert intermediate I), as transformers stores it:
  experts.gate_up_proj  [X, 2I, D]   gate rows then up rows (`is_concatenated`; else interleaved g0 u0 g1 …)
  experts.down_proj     [X, D, I]
  `is_transposed`: [X, D, 2I] and [X, I, D] (every view below is then a transposed view)
  forward(hidden [T, D], top_k_index [T, k], top_k_weights [T, k]) → [T, D]
The router (`mlp.gate`, weight [X, D]) and any shared-expert gate stay full precision.

Per expert e the binarized linears are `{experts}.{e}.gate_proj` [I, D], `.up_proj` [I, D] and
`.down_proj` [D, I]: the per-expert tensors checkpoints store (Qwen/OLMoE under these names; Mixtral's
w1, w3, w2). Each is a view into the fused parameter: reading or writing one expert copies nothing else.

Hessians: H_e = (2/n_e) Σ xᵀx over the n_e calibration tokens routed to expert e (gate/up: the MoE block
input; down: act(x W_gateᵀ) ⊙ (x W_upᵀ) of those tokens, from the current, possibly already binarized,
gate/up). An expert that receives no token gets `NO_TOKEN_RULE`: H = I, so the binarizer's damping makes
it a damped identity and GPTQ's error feedback vanishes: the expert is binarized to minimise its plain
weight error. `expert_report` gives the per-expert fields for `report.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arbq.errors import ArbqError
from arbq.models import layerwise
from arbq.models.activations import Activations

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
NO_TOKEN_RULE = "identity"     # Hessian of an expert no calibration token was routed to


@dataclass(frozen=True)
class MoESpec:
    """Where a decoder layer keeps its fused experts and router (dotted paths inside the layer)."""

    experts: str = "mlp.experts"
    router: str = "mlp.gate"


# the MoE families this transformers provides, all with fused experts; attention (and Qwen2-MoE's
# shared expert) are plain nn.Linear groups as in arbq.models.arch
MOE_ARCHS: dict[str, tuple[tuple[tuple[str, ...], ...], MoESpec]] = {
    name: (groups, MoESpec()) for name, groups in {
        "mixtral": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)),
        "qwen3_moe": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)),
        "olmoe": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",)),
        "qwen2_moe": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                      ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                      ("mlp.shared_expert.down_proj",)),
    }.items()
}


def fused_experts(layer: nn.Module, spec: MoESpec) -> nn.Module | None:
    """The layer's fused experts module, None when this layer's MLP is dense (e.g. Qwen-MoE `mlp_only_layers`)."""
    try:
        mod = layer.get_submodule(spec.experts)
    except AttributeError:
        return None
    fused = getattr(mod, "gate_up_proj", None)
    if not (isinstance(fused, torch.Tensor) and fused.dim() == 3):
        return None
    if not getattr(mod, "has_gate", True) or getattr(mod, "has_bias", False):
        raise ArbqError(f"{spec.experts}: experts without a gate or with biases are not supported")
    return mod


def num_experts(experts: nn.Module) -> int:
    return experts.gate_up_proj.shape[0]


def expert_weight(experts: nn.Module, e: int, proj: str) -> torch.Tensor:
    """Expert e's `proj` weight as an [out, in] view of the fused parameter's data (no copy: writing into
    it, e.g. `.copy_(w)`, changes the model)."""
    transposed = getattr(experts, "is_transposed", False)
    if proj == "down_proj":
        w = experts.down_proj.data[e]
        return w.T if transposed else w
    if proj not in ("gate_proj", "up_proj"):
        raise ValueError(f"unknown expert projection {proj!r}")
    fused = experts.gate_up_proj.data[e]
    fused = fused.T if transposed else fused                      # [2I, D]
    half = fused.shape[0] // 2
    if getattr(experts, "is_concatenated", True):
        return fused[:half] if proj == "gate_proj" else fused[half:]
    return fused[0::2] if proj == "gate_proj" else fused[1::2]


class ExpertLinear:
    """One expert's projection where the stages expect an nn.Linear: `.weight` [out, in] (a view of the
    fused parameter, resolved on every access so it follows the layer across devices and dtypes),
    `.in_features`, `.out_features`; no bias."""

    bias = None

    def __init__(self, experts: nn.Module, e: int, proj: str):
        self.experts, self.expert, self.proj = experts, e, proj

    @property
    def weight(self) -> torch.Tensor:
        return expert_weight(self.experts, self.expert, self.proj)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def expert_name(spec: MoESpec, e: int, proj: str) -> str:
    return f"{spec.experts}.{e}.{proj}"


def expert_groups(spec: MoESpec, n: int) -> tuple[tuple[str, ...], ...]:
    """Shared-input groups of the expert linears in true-sequential order: every expert's (gate, up),
    then every expert's (down,)."""
    return (tuple((expert_name(spec, e, "gate_proj"), expert_name(spec, e, "up_proj")) for e in range(n))
            + tuple((expert_name(spec, e, "down_proj"),) for e in range(n)))


def expert_linears(layer: nn.Module, spec: MoESpec) -> dict[str, ExpertLinear]:
    """name → ExpertLinear for every expert projection of one layer ({} for a dense layer), in
    `expert_groups` order."""
    experts = fused_experts(layer, spec)
    if experts is None:
        return {}
    out = {}
    for group in expert_groups(spec, num_experts(experts)):
        for name in group:
            e, proj = name[len(spec.experts) + 1:].split(".")
            out[name] = ExpertLinear(experts, int(e), proj)
    return out


@dataclass
class ExpertStats:
    """Per-expert Hessians of one layer: `hessians` {name: H [K, K] float32 CPU}, `tokens` {e: n_e},
    `rule` {name: "routed" | NO_TOKEN_RULE}."""

    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    rule: dict[str, str] = field(default_factory=dict)


def expert_report(stats: ExpertStats, name: str) -> dict[str, Any]:
    """The per-expert fields of a report.jsonl row: expert index, routed tokens, Hessian rule."""
    e = int(name.rsplit(".", 2)[-2])
    return {"expert": e, "tokens": stats.tokens[e], "hessian": stats.rule[name]}


def _routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index")
    vals = list(args[:2]) + [kwargs[k] for k in names[len(args[:2]):]]
    return vals[0], vals[1]


@torch.no_grad()
def accumulate_expert_hessians(layer: nn.Module, spec: MoESpec, x: Activations | torch.Tensor, kwargs: dict,
                               device: str = "cpu", dtype: torch.dtype = torch.float32, name: str = "layer",
                               experts: list[int] | None = None, projections: tuple[str, ...] = ("gate_proj",
                               "down_proj"), dense: dict[str, nn.Linear] | None = None,
                               out: Activations | None = None, keep: bool = True
                               ) -> tuple[ExpertStats, Activations | torch.Tensor | None]:
    """Run `layer` on x (see layerwise.forward_layer) and sum, per expert in `experts` (all by default), xᵀx
    of the tokens routed to it: for "gate_proj" (shared by up_proj) the MoE block's input [D, D], for
    "down_proj" the expert's intermediate activations [I, I]. Summed in `dtype` on `device`; returns
    (ExpertStats with H = (2/n_e) Σ xᵀx, or I for an expert with no token, for gate_proj, up_proj and/or
    down_proj, and the layer outputs). `dense` {name: nn.Linear}: in the same pass, their Hessians as
    layerwise.accumulate_hessians gives them (all tokens; in `hessians`, rule "dense").
    Memory: one [D, D] and one [I, I] sum per chosen expert."""
    mod = fused_experts(layer, spec)
    if mod is None:
        raise ArbqError(f"{name}: no fused experts at {spec.experts}")
    if not set(projections) <= {"gate_proj", "down_proj"}:
        raise ValueError(f"projections: 'gate_proj' (its Hessian is up_proj's too) and/or 'down_proj', "
                         f"not {projections}")
    chosen = list(range(num_experts(mod))) if experts is None else list(experts)
    d_in, d_mid = expert_weight(mod, 0, "gate_proj").shape[1], expert_weight(mod, 0, "down_proj").shape[1]
    sums = {(e, p): torch.zeros(k, k, dtype=dtype, device=device) for e in chosen for p, k in
            (("gate_proj", d_in), ("down_proj", d_mid)) if p in projections}
    tokens = dict.fromkeys(chosen, 0)

    def hook(_mod, args, kw):
        hidden, index = _routing(args, kw)
        for e in chosen:
            rows = (index == e).any(dim=-1)
            n = int(rows.sum())
            if n == 0:
                continue
            xe = hidden[rows]
            tokens[e] += n
            if (e, "gate_proj") in sums:
                a = xe.to(dtype)
                sums[e, "gate_proj"].addmm_(a.T, a)
            if (e, "down_proj") in sums:
                mid = mod.act_fn(F.linear(xe, expert_weight(mod, e, "gate_proj"))) * \
                    F.linear(xe, expert_weight(mod, e, "up_proj"))
                a = mid.to(dtype)
                sums[e, "down_proj"].addmm_(a.T, a)

    handle = mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if dense:
            hess, y = layerwise.accumulate_hessians(layer, dense, x, kwargs, device, dtype, name, out=out, keep=keep)
        else:
            hess, y = {}, layerwise.forward_layer(layer, x, kwargs, device, name, out=out, keep=keep)
    finally:
        handle.remove()
    stats = ExpertStats(hessians=dict(hess), tokens=tokens, rule=dict.fromkeys(hess, "dense"))
    for (e, p), s in sums.items():
        n = tokens[e]
        h = (2.0 / n * s).float().cpu() if n else torch.eye(s.shape[0])
        if not torch.isfinite(h).all():
            raise ArbqError(f"{name}.{expert_name(spec, e, p)}: Hessian has NaN/Inf")
        for proj in (("gate_proj", "up_proj") if p == "gate_proj" else (p,)):
            stats.hessians[expert_name(spec, e, proj)] = h
            stats.rule[expert_name(spec, e, proj)] = "routed" if n else NO_TOKEN_RULE
    return stats, y


class ExpertMLP(nn.Module):
    """One expert as three linears: down(act(gate(x)) ⊙ up(x))."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for a fused experts module: a list of `ExpertMLP`s (module names `{e}.gate_proj`, … — what
    a packed checkpoint stores per expert), called like the fused module with the router's choice.
    Its linears can be swapped for packed ones (anything with nn.Linear's call signature)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__(experts)

    @classmethod
    def from_fused(cls, experts: nn.Module, device: str | torch.device | None = None) -> UnfusedExperts:
        """nn.Linear copies of every expert's projections (on the meta device with device="meta", to be
        swapped or filled by a loader)."""
        def linear(w: torch.Tensor) -> nn.Linear:
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta", dtype=w.dtype)
            if str(device) != "meta":
                lin.weight = nn.Parameter(w.detach().to(device or w.device, copy=True), requires_grad=False)
            return lin

        return cls([ExpertMLP(*(linear(expert_weight(experts, e, p)) for p in PROJECTIONS), experts.act_fn)
                    for e in range(num_experts(experts))])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        """hidden_states [T, D], top_k_index / top_k_weights [T, k] → Σ_j w_tj · expert_{i_tj}(x_t), [T, D]."""
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < len(self):
                continue
            token, slot = torch.where(top_k_index == e)
            y = self[e](hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def unfuse_experts(layers: nn.ModuleList, spec: MoESpec, device: str | torch.device | None = None) -> int:
    """Replace every layer's fused experts module by an `UnfusedExperts` in place; returns how many."""
    count = 0
    for layer in layers:
        fused = fused_experts(layer, spec)
        if fused is None:
            continue
        parent, _, attr = spec.experts.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, attr, UnfusedExperts.from_fused(fused, device))
        count += 1
    return count
