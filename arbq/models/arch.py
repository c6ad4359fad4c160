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

Adding a family: if its decoder layer is called as `layer(hidden_states, **kwargs)` and its linears are
`nn.Linear`, one row here (the layers path, the linear groups, any `unused` modules) plus a tiny random
model in the tests is all it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from arbq.errors import ArbqError


@dataclass(frozen=True)
class ArchSpec:
    layers: str                              # dotted path of the decoder-layer ModuleList
    groups: tuple[tuple[str, ...], ...]      # linears of one layer, grouped by shared input
    unused: tuple[str, ...] = ()             # dotted paths of modules a text-only forward never runs

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


def arch_for(model_type: str) -> ArchSpec:
    """The ArchSpec for a `model_type`; an unknown one raises ArbqError naming the supported ones."""
    try:
        return ARCHS[model_type]
    except KeyError:
        raise ArbqError(f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHS))}") \
            from None


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return model.get_submodule(spec.layers)


def layer_linears(layer: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """name → nn.Linear for every binarized linear of one decoder layer, in true-sequential order."""
    out = {}
    for name in spec.linears:
        mod = layer.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ArbqError(f"{name} is a {type(mod).__name__}, not nn.Linear")
        out[name] = mod
    return out
