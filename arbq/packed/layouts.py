"""The packed layouts, by name: how a module's `quantization_config` entry is read and its tensors packed.

A layout is one record (`Layout`): its spec type (shapes, honest-bits formula, params <-> config), how
to pack a fit's result, how to rebuild rows of Ŵ (the torch backend's and `dequantize`'s path), and
how to validate loaded tensors. `quantization_config.modules[name] = {"layout", "method", "params"}`;
kernels declare the layouts they run (arbq.kernels), the torch backend runs them all.

    binary   arbq.packed.format / codec: sign planes, group bits, salient columns, row/column scales
    uniform  arbq.packed.uniform: asymmetric k-bit codes per column group (the GPTQ baseline)
    binary_nm  arbq.packed.nm: N:M-pruned binary weights (PBS²P / STBLLM): an occupancy plane, sign and group
               planes compacted to the kept positions, the binary layout's other tensors
    binary_lut arbq.packed.lut: the binary layout's bits interleaved by 16 rows as the CPU lookup kernel reads
               them (`arbq pack --interleave`): no run-time copy
    binary_nm_lut  arbq.packed.nm_lut: binary_nm's planes expanded and interleaved the same way, with the
               occupancy plane (`arbq pack --interleave` of an N:M run with column scales)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from arbq.errors import ArbqError
from arbq.packed import codec, lut, nm, nm_lut, order, uniform
from arbq.packed.codec import PackedLinear
from arbq.packed.format import LinearSpec, Scheme

ROWS_PER_TILE = 1024


def _pack_binary(res: Any, params: dict, scale_dtype: str, name: str = "linear") -> PackedLinear:
    """params: the Scheme flags (rc, salient, group, cgb) and the recipe's blocksize."""
    if res.blocksize != params["blocksize"]:
        raise ArbqError(f"{name}: result blocksize {res.blocksize} does not match the recipe's {params['blocksize']}")
    scheme = Scheme.from_params(params)
    codec.check_representable(res, scheme, name)
    return codec.pack_linear(res, scheme, scale_dtype)


def _stored_binary(res: Any, params: dict, scale_dtype: str) -> dict[str, torch.Tensor]:
    """The binary-family results' values (α, μ, column scales) as the layout stores them (codec.stored_values);
    an N:M result's are its base's."""
    scheme = Scheme.from_params(params)
    return codec.stored_values(getattr(res, "base", res), scheme, scale_dtype)


@dataclass(frozen=True)
class Layout:
    """name; spec_type: from_params(params, where) -> spec; pack(result, params, scale_dtype, name);
    dequantize_rows(p, r0, r1) -> Ŵ[r0:r1] fp32, columns in the stored order (input_columns); validate(p, name)
    raises ArbqError; stored_values(result, params, scale_dtype) -> the result's value tensors exactly as packed
    and read back (for results with `with_values`; None: the fit's own rounding is what is stored)."""

    name: str
    spec_type: type
    pack: Callable[..., PackedLinear]
    dequantize_rows: Callable[[PackedLinear, int, int], torch.Tensor]
    validate: Callable[[PackedLinear, str], None]
    stored_values: Callable[[Any, dict, str], dict[str, torch.Tensor]] | None = None


LAYOUTS: dict[str, Layout] = {
    "binary": Layout("binary", LinearSpec, _pack_binary,
                     lambda p, r0, r1: codec.unpack_rows(p, r0, r1).dequantize(), codec.validate_packed,
                     _stored_binary),
    "uniform": Layout("uniform", uniform.UniformSpec, uniform.pack, uniform.dequantize_rows, uniform.validate),
    "binary_nm": Layout("binary_nm", nm.NMSpec, nm.pack, nm.dequantize_rows, nm.validate, _stored_binary),
    "binary_lut": Layout("binary_lut", lut.LutSpec, lut.pack, lut.dequantize_rows, lut.validate, _stored_binary),
    "binary_nm_lut": Layout("binary_nm_lut", nm_lut.NMLutSpec, nm_lut.pack, nm_lut.dequantize_rows, nm_lut.validate,
                            _stored_binary),
}


def layout_of(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except (KeyError, TypeError):
        raise ArbqError(f"unknown packed layout {name!r}; this arbq reads: {', '.join(LAYOUTS)}") from None


def spec_from_entry(entry: Any, where: str) -> Any:
    """The spec of one `quantization_config.modules` entry {"layout", "method", "params"}."""
    if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
        raise ArbqError(f"quantization_config: module {where} must be a mapping with 'layout' and 'params'")
    return layout_of(entry.get("layout")).spec_type.from_params(entry["params"], where)


def dequantize(p: PackedLinear, rows: int = ROWS_PER_TILE) -> torch.Tensor:
    """Ŵ [N, K] fp32 of any layout, `rows` rows at a time, columns in the model's order."""
    n, k = p.spec.out_features, p.spec.in_features
    fn = layout_of(p.spec.layout).dequantize_rows
    w = torch.cat([fn(p, r, min(r + rows, n)) for r in range(0, n, rows)]) if n else torch.zeros(0, k)
    return order.in_model_order(w, input_columns(p))


def input_columns(p: PackedLinear) -> torch.Tensor | None:
    """π, int64 [K], for a layout that stores its columns in another order than the model's (a run order,
    arbq.packed.order: binary with run_order, binary_nm and binary_nm_lut with nm_act_order): every kernel computes
    y = x[..., π] @ Ŵ_storedᵀ; None for the others."""
    return order.input_columns(p)


def lookup_form(p: PackedLinear, name: str = "linear",
                expand: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> PackedLinear:
    """p in the CPU lookup kernel's own layout where it has one (`arbq pack --interleave`): binary -> binary_lut
    (grouped schemes with salient columns; a run order comes along), binary_nm -> binary_nm_lut (those with column
    scales too; `expand`: nm.binary_rows' plane expansion); else p."""
    if p.spec.layout == "binary" and lut.supports(p.spec.scheme, p.spec.blocksize):
        return lut.from_binary(p, name)
    if p.spec.layout == "binary_nm" and nm_lut.supports(p.spec):
        return nm_lut.from_nm(p, name, expand)
    return p


# lookup form -> the layout it was rearranged from, and the exact inverse
FROM_LOOKUP: dict[str, tuple[str, Callable[[PackedLinear], PackedLinear]]] = {
    "binary_lut": ("binary", lut.to_binary), "binary_nm_lut": ("binary_nm", nm_lut.to_nm)}


def from_lookup_form(p: PackedLinear, layout: str) -> PackedLinear:
    """p back in `layout` when p is lookup_form's rearrangement of a layer stored so (the same tensors); else p."""
    back = FROM_LOOKUP.get(p.spec.layout)
    return back[1](p) if back is not None and back[0] == layout else p


def validate(p: PackedLinear, name: str = "linear") -> None:
    layout_of(p.spec.layout).validate(p, name)
