"""The "binary_lut" layout: the binary layout's bits and values, arranged as the CPU table-lookup kernel
reads them, so a process running a loaded model holds the file's bytes and no second copy.

For the grouped schemes with salient columns (billm, arb-x, arb-rc, with or without CGB) and a block size
that is a multiple of 4 — the schemes the lookup kernel runs. Rows are taken 16 at a time (row group G =
rows 16G..16G+15, N16 = ⌈N/16⌉; rows past N are stored as zeros and counted), KQ = ⌈K/4⌉:

    codes        uint8 [N16, KQ, 16]   byte (G, q, r), row i = 16G + r: low nibble = code of columns
                                       (4q, 4q+1), high nibble = code of (4q+2, 4q+3); the code of a column
                                       pair (a, b) = s1_a | g_a<<1 | s1_b<<2 | g_b<<3 (sign bit 1 = +1,
                                       group bit as the binary layout's, 0 at salient columns without CGB)
    salient      uint8 [⌈K/8⌉]         the salient-column bitmap, as binary
    sign2        int16 [N16, S]        bit r of (G, p): second sign of row 16G + r at salient column p
    values       sd    [N16, T, V, 16] the binary layout's values [N, T, V] with rows last
    colscale_ns, colscale_sal, *_scale, run_order  as binary (run_order: params run_order: true)

The bits are the binary layout's, rearranged: honest bits are equal for N a multiple of 16 (row padding
otherwise; every byte is counted). The torch backend reads it by rebuilding binary rows (`binary_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from arbq.errors import ArbqError
from arbq.packed import codec
from arbq.packed.codec import PackedLinear
from arbq.packed.format import COMPONENTS, BinaryBased, LinearSpec, Scheme, pack_bits, scale_dtype_of, unpack_bits
from arbq.packed.order import ORDER, RUN, order_bits

LANES = 16                       # rows per row group (the kernel's vector lanes)
CODE_COMPONENT = "sign_and_group"
SHARED = ("salient", "colscale_ns", "colscale_sal", "colscale_ns_scale", "colscale_sal_scale", "values_scale", ORDER)


def supports(scheme: Scheme, blocksize: int) -> bool:
    """Whether a binary scheme has a binary_lut form (the lookup kernel's schemes)."""
    return scheme.group and scheme.salient and blocksize % 4 == 0


@dataclass(frozen=True)
class LutSpec(BinaryBased):
    """Shapes and bit counts of one linear in the "binary_lut" layout (the layout protocol, see
    arbq.packed.layouts): the binary LinearSpec's fields, the tensors interleaved by 16 rows."""

    layout: ClassVar[str] = "binary_lut"
    ordered: bool = False

    @classmethod
    def of(cls, binary: LinearSpec, where: str = "binary_lut module") -> LutSpec:
        if not supports(binary.scheme, binary.blocksize):
            raise ArbqError(f"{where}: layout binary_lut needs a scheme with group bits and salient columns and a "
                            f"block size that is a multiple of 4 (got {binary.describe()})")
        return cls(*cls.fields_of(binary), binary.ordered)

    @property
    def binary(self) -> LinearSpec:
        """The spec of the same linear in the binary layout (with its run order, if stored)."""
        return LinearSpec(*self.fields_of(self), self.ordered)

    @property
    def run_length(self) -> int:
        return RUN

    @property
    def row_groups(self) -> int:
        return -(-self.out_features // LANES)

    def to_params(self) -> dict[str, Any]:
        return self.binary.to_params()

    @classmethod
    def from_params(cls, params: dict, where: str = "binary_lut module") -> LutSpec:
        return cls.of(LinearSpec.from_params(params, where), where)

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The binary layout's shared tensors plus codes uint8 [N16, KQ, 16], sign2 int16 [N16, S] and
        values [N16, T, V, 16]."""
        b = self.binary.tensor_shapes()
        n16, kq = self.row_groups, -(-self.in_features // 4)
        out = {"codes": ((n16, kq, LANES), torch.uint8)}
        out.update({k: v for k, v in b.items() if k in SHARED})
        out["sign2"] = ((n16, self.n_salient), torch.int16)
        out["values"] = ((n16, self.n_blocks, self.scheme.n_values, LANES), b["values"][1])
        return out

    def formula_bits(self, bias_bits: int = 0) -> dict[str, int]:
        """sign_and_group 8·16·N16·KQ (2 bits per weight, rows padded to 16, columns to 4), second_sign
        16·N16·S, row_values 16·N16·T·V·sb (+ 32 for fp8), the rest as binary."""
        b = self.binary.formula_bits(bias_bits)
        n16, kq, rows = self.row_groups, -(-self.in_features // 4), LANES * self.row_groups
        sb = torch.finfo(scale_dtype_of(self.scale_dtype)).bits
        return {CODE_COMPONENT: 8 * LANES * n16 * kq, "second_sign": rows * self.n_salient,
                "salient_bitmap": b["salient_bitmap"],
                "row_values": rows * self.n_blocks * self.scheme.n_values * sb
                + (32 if self.scale_dtype == "fp8" else 0),
                "col_scales": b["col_scales"], **order_bits(self), "bias": b["bias"]}

    def paper_bits(self) -> int:
        return self.binary.paper_bits()

    @staticmethod
    def component(suffix: str) -> str:
        return CODE_COMPONENT if suffix == "codes" else COMPONENTS[suffix]

    def describe(self) -> str:
        return "layout=binary_lut, " + self.binary.describe().removeprefix("layout=binary, ")


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [n, ...] with zero rows appended up to `rows`."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def rows_last(values: torch.Tensor, row_groups: int) -> torch.Tensor:
    """Row values [N, T, V] -> [row_groups, T, V, 16] (rows past N: 0): row 16G + r at (G, :, :, r)."""
    v = pad_rows(values, LANES * row_groups)
    return v.reshape(row_groups, LANES, *v.shape[1:]).permute(0, 2, 3, 1)


def _row_words(bits: torch.Tensor) -> torch.Tensor:
    """bool [16·N16, S] -> int16 [N16, S]: bit r of (G, p) = bits[16G + r, p]."""
    n16 = bits.shape[0] // LANES
    w = (bits.reshape(n16, LANES, -1).int() << torch.arange(LANES, dtype=torch.int32).view(1, LANES, 1)).sum(1)
    return torch.where(w < 32768, w, w - 65536).to(torch.int16)


def _row_bits(words: torch.Tensor) -> torch.Tensor:
    """int16 [G, S] -> bool [16·G, S], inverse of _row_words."""
    bits = (words.int().unsqueeze(1) >> torch.arange(LANES, dtype=torch.int32).view(1, LANES, 1)) & 1
    return bits.reshape(LANES * words.shape[0], words.shape[1]).bool()


def codes_of(sign1: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """bool [16·N16, K] sign and group planes -> codes uint8 [N16, ⌈K/4⌉, 16] (the module docstring's code)."""
    rows, k = sign1.shape
    kq = -(-k // 4)
    s = torch.zeros(rows, 4 * kq, dtype=torch.uint8)
    g = torch.zeros_like(s)
    s[:, :k], g[:, :k] = sign1, group
    code2 = s | (g << 1)
    pair = code2[:, 0::2] | (code2[:, 1::2] << 2)
    quad = pair[:, 0::2] | (pair[:, 1::2] << 4)
    return quad.reshape(rows // LANES, LANES, kq).transpose(1, 2).contiguous()


def planes_of(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [G, KQ, 16] -> (sign1, group) bool [16·G, k], inverse of codes_of."""
    g16, kq, _ = codes.shape
    quad = codes.transpose(1, 2).reshape(g16 * LANES, kq)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
    code2 = ((quad.unsqueeze(-1) >> shifts) & 3).reshape(g16 * LANES, 4 * kq)[:, :k]
    return (code2 & 1).bool(), (code2 & 2).bool()


def from_binary(p: PackedLinear, where: str = "linear") -> PackedLinear:
    """A "binary" PackedLinear rearranged into "binary_lut" (same bits; rows padded to a multiple of 16)."""
    spec = LutSpec.of(p.spec, where)
    k, s, rows = spec.in_features, spec.n_salient, LANES * spec.row_groups
    sign1 = pad_rows(unpack_bits(p["sign1"], k), rows)
    group = pad_rows(unpack_bits(p["group"], k), rows)
    out = {"codes": codes_of(sign1, group)}
    out.update({name: t for name, t in p.tensors.items() if name in SHARED})
    out["sign2"] = _row_words(pad_rows(unpack_bits(p["sign2"], s), rows))
    out["values"] = rows_last(p["values"], spec.row_groups)
    return PackedLinear(spec, {name: t.contiguous() for name, t in out.items()})


def binary_rows(p: PackedLinear, r0: int, r1: int) -> PackedLinear:
    """Rows r0:r1 as a "binary" layout PackedLinear (the torch backend's and dequantize's path)."""
    spec = p.spec
    k = spec.in_features
    g0, g1 = r0 // LANES, -(-r1 // LANES)
    lo, hi = r0 - LANES * g0, r1 - LANES * g0
    sign1, group = planes_of(p["codes"][g0:g1], k)
    vals = p["values"][g0:g1].permute(0, 3, 1, 2).reshape(LANES * (g1 - g0), spec.n_blocks, -1)
    t = {name: x for name, x in p.tensors.items() if name in SHARED}
    t.update(sign1=pack_bits(sign1[lo:hi]), group=pack_bits(group[lo:hi]),
             sign2=pack_bits(_row_bits(p["sign2"][g0:g1])[lo:hi]), values=vals[lo:hi])
    return PackedLinear(replace(spec.binary, out_features=r1 - r0), t)


def to_binary(p: PackedLinear) -> PackedLinear:
    """The "binary" PackedLinear a binary_lut one was rearranged from (inverse of from_binary: the same tensors)."""
    return binary_rows(p, 0, p.spec.out_features)


def pack(res: Any, params: dict, scale_dtype: str, name: str = "linear") -> PackedLinear:
    """Pack a binary fit (LinearResult) as the binary layout does, then interleave it."""
    from arbq.packed.layouts import layout_of

    return from_binary(layout_of("binary").pack(res, params, scale_dtype, name), name)


def dequantize_rows(p: PackedLinear, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of Ŵ, fp32 [r1 − r0, K] (binary_rows, then the binary equation)."""
    return codec.unpack_rows(binary_rows(p, r0, r1)).dequantize()


def validate(p: PackedLinear, name: str = "linear") -> None:
    """The binary layout's checks (shapes, uint8 planes, the salient bitmap's count: codec.validate_packed)
    and sign2's dtype, int16."""
    codec.validate_packed(p, name)
    if p["sign2"].dtype != torch.int16:
        raise ArbqError(f"{name}.sign2: expected torch.int16, got {p['sign2'].dtype}")
