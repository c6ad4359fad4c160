"""`quant_method: "arbq"` for transformers: AutoModelForCausalLM.from_pretrained(PACKED) after `import arbq`.

Registered under "arbq" with transformers' public decorators. Before the weights load, the quantizer
verifies the sha256 manifest, swaps every packed nn.Linear (still on the meta device) for a
BinaryLinear and checks the checkpoint's keys and shapes against the model, so that a missing or
unexpected tensor is an error instead of a silently random-initialised weight. Transformers may cast
the floating packed values to the requested dtype; BinaryLinear reads whatever dtype it holds.
With `device_map="cpu"` each packed linear is then held in the layout the CPU kernel reads in place (as
`arbq.load` does on the CPU; a later move off the CPU restores the stored layouts); without a device map they are
kept as stored.
`arbq.load` is the direct path (keeps the stored dtypes of packed tensors).
"""

from __future__ import annotations

from pathlib import Path

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from arbq.errors import ArbqError
from arbq.models.arch import unfuse_moe
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.format import QUANT_METHOD
from arbq.packed.layouts import validate
from arbq.packed.loader import (
    adopt_resident_forms,
    check_checkpoint,
    check_quant_config,
    own_copies,
    read_header,
    release_freed_memory,
    swap_linears,
    verify_manifest,
)


class ArbqConfig(QuantizationConfigMixin):
    """The `quantization_config` block written by `arbq pack` (format version 1 or 2, see arbq.packed.loader),
    kept as stored; `checked()` is its validated version-2 form."""

    def __init__(self, **fields):
        fields.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self._fields = fields
        self.checked()  # refuses an unknown format_version, bit order, layout or malformed module entry

    def checked(self) -> dict:
        return check_quant_config(self.to_dict())

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, **self._fields}


class ArbqHfQuantizer(HfQuantizer):
    """Pre-quantized only: swaps packed linears for BinaryLinear before the weights are loaded."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        self._on_cpu = _all_cpu(kwargs.get("device_map"))
        files = [Path(f) for f in checkpoint_files or []]
        if not files:
            raise ArbqError("arbq: from_pretrained gave no checkpoint files to verify")
        verify_manifest(files[0].parent)
        q = self.quantization_config.checked()
        dev = next((p.device for p in model.parameters()), "meta")
        unfuse_moe(model, device=dev)       # MoE: per-expert linears, as pack stored them
        swap_linears(model, q, device=dev, dtype=dtype or next(model.parameters()).dtype)
        check_checkpoint(model, read_header(files))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        left = [n for m_name, m in model.named_modules() if isinstance(m, BinaryLinear)
                for n, t in m.named_buffers(prefix=m_name) if t.device.type == "meta"]
        if left:
            raise ArbqError(f"arbq: packed tensors not loaded: {left[:5]}")
        for name, mod in model.named_modules():
            if isinstance(mod, BinaryLinear):
                validate(mod.packed(), name)
        q = self.quantization_config.checked()
        if getattr(self, "_on_cpu", False) and adopt_resident_forms(model, q["modules"]):
            self.quantization_config._fields = {k: v for k, v in q.items() if k != "quant_method"}
            own_copies(model)
            release_freed_memory()
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _all_cpu(device_map) -> bool:
    """Whether a from_pretrained device_map puts the whole model on the CPU ("cpu", or every entry "cpu")."""
    if isinstance(device_map, dict):
        return bool(device_map) and all(str(v) == "cpu" for v in device_map.values())
    return device_map is not None and str(device_map) == "cpu"


def register() -> None:
    """Register "arbq" with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ArbqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ArbqHfQuantizer)


register()
