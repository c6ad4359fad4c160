"""Every dtype name arbq reads or writes, in one place.

BY_NAME:      arbq's own names (`--dtype`, `--scale-dtype`, recipes' scale_dtype)
HF_NAMES:     the names transformers writes in config.json's "dtype"
SAFETENSORS:  the dtype strings of safetensors headers
"""

from __future__ import annotations

import torch

from arbq.errors import ArbqError

BY_NAME: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                                   "fp8": torch.float8_e4m3fn}
HF_NAMES: dict[str, str] = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
FLOAT_WEIGHTS = ("F64", "F32", "F16", "BF16")   # header dtypes a checkpoint's float weights come in


def by_name(name: str, allowed: tuple[str, ...] = tuple(BY_NAME), what: str = "dtype") -> torch.dtype:
    """BY_NAME[name], refused with one line unless it is one of `allowed`."""
    if name not in allowed:
        raise ArbqError(f"unknown {what} {name!r}; choose one of: {', '.join(allowed)}")
    return BY_NAME[name]


def from_safetensors(name: str) -> torch.dtype:
    try:
        return SAFETENSORS[name]
    except KeyError:
        raise ArbqError(f"unsupported tensor dtype {name} in checkpoint") from None
