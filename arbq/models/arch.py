"""The one table of model-specific knowledge, keyed by `config.model_type`.

Each entry names the ModuleList of decoder layers and the linears of one decoder layer, grouped by
shared input, in the order data flows through them ("true-sequential" order):
attention inputs, attention output, MLP inputs, MLP output. Linears in one group share one Hessian.
Everything else (embeddings, norms, lm_head) stays full precision; `unused` names the modules a
text-only forward never touches (the vision tower of a multimodal checkpoint): they are never read
by the layer-wise stages and are copied unchanged.

What differs per layer inside one model (Gemma 2/3's sliding-window vs full-attention layers with
their own masks and, in Gemma 3, their own rotary tables) needs no entry: the layer-wise path records
the keyword arguments the model itself passes to each decoder layer (arbq.models.layerwise).

Mixture-of-experts families (`moe.MOE_ARCHS`: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) get their ArchSpec from
the config (`arch_for(model_type, config)`): the dense groups, then every expert's (gate_proj, up_proj) and
every expert's (down_proj,) under `mlp.experts.{e}.…` (`moe.expert_groups`), each a view into the fused
parameters (`layer_linears` gives `moe.ExpertLinear`s for them).

Adding a family: if its decoder layer is called as `layer(hidden_states, **kwargs)` and its linears are
`nn.Linear`, one row here (the layers path, the linear groups, any `unused` modules) plus a tiny random
model in the tests is all it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from arbq.errors import ArbqError
from arbq.models import moe


@dataclass(frozen=True)
class ArchSpec:
    layers: str                              # dotted path of the decoder-layer ModuleList
    groups: tuple[tuple[str, ...], ...]      # linears of one layer, grouped by shared input
    unused: tuple[str, ...] = ()             # dotted paths of modules a text-only forward never runs
    moe: moe.MoESpec | None = None           # fused experts (mixture of experts): groups end with expert_groups

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)


_LLAMA = ArchSpec(
    layers="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    # Gemma 3 multimodal (Gemma3ForConditionalGeneration): the same language model one level deeper;
    # the SigLIP vision tower and the projector stay full precision and are never loaded layer-wise
    "gemma3": ArchSpec(layers="model.language_model.layers", groups=_LLAMA.groups,
                       unused=("model.vision_tower", "model.multi_modal_projector")),
    "phi3": ArchSpec(
        layers="model.layers",
        groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "opt": ArchSpec(
        layers="model.decoder.layers",
        groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
                ("fc1",), ("fc2",)),
    ),
}


def arch_for(model_type: str, config=None) -> ArchSpec:
    """The ArchSpec for a `model_type`; an unknown one raises ArbqError naming the supported ones.
    Mixture-of-experts families (`moe.MOE_ARCHS`) need the model's `config`: their groups are the dense
    groups followed by `moe.expert_groups` for the config's number of experts."""
    if model_type in moe.MOE_ARCHS:
        return _moe_arch(model_type, config)
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ArbqError(f"unsupported architecture {model_type!r}; supported: "
                        f"{', '.join(sorted([*ARCHS, *moe.MOE_ARCHS]))}") from None


def _moe_arch(model_type: str, config) -> ArchSpec:
    dense, mspec = moe.MOE_ARCHS[model_type]
    if config is None:
        raise ValueError(f"arch_for({model_type!r}) needs the model config (mixture of experts)")
    n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not isinstance(n, int) or n < 1:
        raise ArbqError(f"{model_type}: config.json names no number of experts")
    if list(getattr(config, "mlp_only_layers", None) or []) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise ArbqError(f"{model_type}: models with dense-MLP layers between the MoE layers (mlp_only_layers, "
                        f"decoder_sparse_step != 1) are not supported")
    return ArchSpec(layers="model.layers", groups=dense + moe.expert_groups(mspec, n), moe=mspec)


def is_expert(spec: ArchSpec, name: str) -> bool:
    """True for an expert projection (`mlp.experts.{e}.gate_proj`, …) of an MoE spec."""
    return spec.moe is not None and name.startswith(spec.moe.experts + ".")


def unfuse_moe(model: nn.Module, device="meta") -> int:
    """Packed-model skeletons: replace every fused experts module by per-expert linears
    (`moe.unfuse_experts`) when `model` is one of the MoE families; returns how many (0 otherwise)."""
    config = model.config
    if config.model_type not in moe.MOE_ARCHS:
        return 0
    spec = arch_for(config.model_type, config)
    return moe.unfuse_experts(decoder_layers(model, spec), spec.moe, device=device)


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.layers)


def layer_linears(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """name → nn.Linear for every binarized linear of one decoder layer, in true-sequential order
    (an expert projection of an MoE layer: a `moe.ExpertLinear`, a view into the fused parameter)."""
    out = {}
    experts = moe.expert_linears(layer, spec.moe) if spec.moe is not None else {}
    for name in spec.linears:
        if is_expert(spec, name):
            if name not in experts:
                raise ArbqError(f"{name}: this decoder layer has no such fused expert")
            out[name] = experts[name]
            continue
        mod = layer.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ArbqError(f"{name} is a {type(mod).__name__}, not nn.Linear")
        out[name] = mod
    return out
