"""The "binary_nm_lut" layout: an N:M-pruned binarized linear (arbq.packed.nm) as the CPU lookup kernel reads
it, so a process running a loaded model holds the file's bytes and no load-time copy (`arbq pack --interleave`
of a binary_nm run). binary_nm stores compacted planes (smaller); this layout stores what the kernel reads.

For binary_nm schemes with column scales (rc, ± cgb: the N:M lookup's schemes) whose binary form has a
binary_lut layout (group bits, salient columns, block size a multiple of 4; arbq.packed.lut). Rows 16 at a time
(row group G = rows 16G..16G+15, N16 = ⌈N/16⌉, rows past N stored as zeros and counted), KQ = ⌈K/4⌉:

    codes   uint8 [N16, KQ, 16]     binary_lut's codes of the expanded sign / group planes; a pruned weight's
                                    sign and group bits are 0 (the kernel's pruned-sum tables cancel it)
    keep    uint8 [N16, ⌈K/8⌉, 16]  byte (G, b, r) = occupancy bits of columns 8b..8b+7 of row 16G + r
    salient, sign2 int16 [N16, S], values [N16, T, V, 16], colscale_*, *_scale: as binary_lut

    Ŵ[i, j] = keep[i, j] · Ŵ_binary_lut[i, j]          (exact zeros at pruned positions)

Honest bits = binary_lut's + nm_positions 8·16·N16·⌈K/8⌉: 2 bits of codes and 1 of position for every weight,
kept or pruned, 3 b/w against binary_nm's 1 + 2n/m (2.5 at 6:8, 2.25 at 5:8, 2.0 at 4:8). The paper bits are
binary_nm's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from arbq.errors import ArbqError
from arbq.packed import lut, nm
from arbq.packed.codec import PackedLinear
from arbq.packed.format import BinaryBased, pack_bits, unpack_bits
from arbq.packed.lut import LANES
from arbq.packed.nm import KEEP
from arbq.packed.order import ORDER, check_order, order_bits, order_shape

VALIDATE_ROWS = 64      # rows per check at load: small temporaries, which the allocator reuses instead of keeping
                        # (1024-row tiles left ~100 MB resident after loading a 4096-class model)


def supports(spec: nm.NMSpec) -> bool:
    """Whether a binary_nm linear has a binary_nm_lut form (the N:M lookup kernel's schemes)."""
    return spec.scheme.rc and lut.supports(spec.scheme, spec.blocksize)


@dataclass(frozen=True)
class NMLutSpec(BinaryBased):
    """Shapes and bit counts of one linear in the "binary_nm_lut" layout (the layout protocol, see
    arbq.packed.layouts): binary_nm's fields (the binary fields plus n, m), the tensors as binary_lut's plus
    the occupancy plane interleaved by 16 rows."""

    layout: ClassVar[str] = "binary_nm_lut"
    n: int
    m: int
    ordered: bool = False

    @classmethod
    def of(cls, spec: nm.NMSpec, where: str = "binary_nm_lut module") -> NMLutSpec:
        if not supports(spec):
            raise ArbqError(f"{where}: layout binary_nm_lut needs an N:M scheme with column scales (rc), group bits, "
                            f"salient columns and a block size that is a multiple of 4 (got {spec.describe()})")
        return cls(*cls.fields_of(spec), spec.n, spec.m, spec.ordered)

    @property
    def run_length(self) -> int:
        return self.m

    @property
    def nm(self) -> nm.NMSpec:
        return nm.NMSpec.of(self.binary, self.n, self.m, self.ordered)

    @property
    def lut(self) -> lut.LutSpec:
        return lut.LutSpec.of(self.binary)

    @property
    def row_groups(self) -> int:
        return -(-self.out_features // LANES)

    def to_params(self) -> dict[str, Any]:
        return self.nm.to_params()

    @classmethod
    def from_params(cls, params: dict, where: str = "binary_nm_lut module") -> NMLutSpec:
        return cls.of(nm.NMSpec.from_params(params, where), where)

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """binary_lut's tensors plus keep uint8 [N16, ⌈K/8⌉, 16] (and binary_nm's run_order when ordered)."""
        return {**self.lut.tensor_shapes(), KEEP: ((self.row_groups, -(-self.in_features // 8), LANES), torch.uint8),
                **order_shape(self)}

    def formula_bits(self, bias_bits: int = 0) -> dict[str, int]:
        """binary_lut's components plus nm_positions 8·16·N16·⌈K/8⌉ (and run_order 16·⌊K/m⌋ when ordered)."""
        out = self.lut.formula_bits(bias_bits)
        bias = out.pop("bias")
        return {**out, "nm_positions": 8 * LANES * self.row_groups * -(-self.in_features // 8),
                **order_bits(self), "bias": bias}

    def paper_bits(self) -> int:
        return self.nm.paper_bits()

    @staticmethod
    def component(suffix: str) -> str:
        return nm.NM_COMPONENTS.get(suffix) or lut.LutSpec.component(suffix)

    def describe(self) -> str:
        return f"layout=binary_nm_lut, n:m={self.n}:{self.m}{', run order' if self.ordered else ''}, " + \
            self.binary.describe().removeprefix("layout=binary, ")


def keep_bytes(keep: torch.Tensor, row_groups: int) -> torch.Tensor:
    """The occupancy plane uint8 [N, ⌈K/8⌉] -> uint8 [row_groups, ⌈K/8⌉, 16] (rows past N: 0): byte (G, b, r) =
    columns 8b..8b+7 of row 16G + r."""
    return lut.pad_rows(keep, LANES * row_groups).reshape(row_groups, LANES, -1).transpose(1, 2).contiguous()


def keep_rows(p: PackedLinear, r0: int, r1: int) -> torch.Tensor:
    """bool [r1 − r0, K]: the occupancy bits of rows r0:r1, inverse of keep_bytes."""
    g0, g1 = r0 // LANES, -(-r1 // LANES)
    plane = p[KEEP][g0:g1].transpose(1, 2).reshape(LANES * (g1 - g0), -1)
    return unpack_bits(plane[r0 - LANES * g0:r1 - LANES * g0], p.spec.in_features)


def as_lut(p: PackedLinear) -> PackedLinear:
    """The binary_lut view of a binary_nm_lut linear (its tensors but keep, no copy): Ŵ before the mask."""
    return PackedLinear(p.spec.lut, {name: t for name, t in p.tensors.items() if name not in (KEEP, ORDER)})


def from_nm(p: PackedLinear, where: str = "linear",
            expand: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> PackedLinear:
    """A "binary_nm" PackedLinear rearranged into "binary_nm_lut" (its planes expanded by nm.binary_rows with
    `expand`, then interleaved as binary_lut; the keep plane interleaved by keep_bytes)."""
    spec = NMLutSpec.of(p.spec, where)
    q = lut.from_binary(nm.binary_rows(p, 0, spec.out_features, expand), where)
    order = {name: p[name] for name in order_shape(p.spec)}
    return PackedLinear(spec, {**q.tensors, KEEP: keep_bytes(p[KEEP], spec.row_groups), **order})


def to_nm(p: PackedLinear) -> PackedLinear:
    """The "binary_nm" PackedLinear a binary_nm_lut one was rearranged from (inverse of from_nm): sign and group
    planes compacted to the kept positions again, the occupancy plane by rows."""
    b, keep = lut.to_binary(as_lut(p)), keep_rows(p, 0, p.spec.out_features)
    k = p.spec.in_features
    planes = {name: nm.compact_plane(unpack_bits(b[name], k), keep).contiguous() for name in nm.COMPACT
              if name in b.tensors}
    order = {name: p[name] for name in order_shape(p.spec)}
    return PackedLinear(p.spec.nm, {**b.tensors, **planes, KEEP: pack_bits(keep).contiguous(), **order})


def pack(res: nm.NMResult, params: dict, scale_dtype: str, name: str = "linear") -> PackedLinear:
    """Pack an NMResult as binary_nm does, then interleave it."""
    return from_nm(nm.pack(res, params, scale_dtype, name), name)


def dequantize_rows(p: PackedLinear, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of Ŵ, fp32 [r1 − r0, K]: binary_lut's rows, zero where pruned, columns in the stored order (as
    binary_nm's)."""
    w = lut.dequantize_rows(as_lut(p), r0, r1)
    return torch.where(keep_rows(p, r0, r1), w, torch.zeros((), dtype=w.dtype))


def validate(p: PackedLinear, name: str = "linear") -> None:
    """binary_lut's checks (shapes of every tensor, the salient bitmap's count, sign2 int16), the N:M pattern of
    the occupancy plane, and sign / group bits 0 at every pruned position (what the kernel's cancellation of
    pruned weights assumes)."""
    lut.validate(p, name)
    spec = p.spec
    if spec.ordered:
        check_order(p[ORDER], spec.in_features, spec.m, name)
    for r0 in range(0, spec.out_features, VALIDATE_ROWS):
        r1 = min(r0 + VALIDATE_ROWS, spec.out_features)
        keep = keep_rows(p, r0, r1)
        if not nm.nm_counts_ok(keep, spec.n, spec.m):
            raise ArbqError(f"{name}: the keep plane is not {spec.n}:{spec.m} (every {spec.m} consecutive columns "
                            f"of a row must keep {spec.n})")
        g0, lo = r0 // LANES, r0 - LANES * (r0 // LANES)
        sign1, group = lut.planes_of(p["codes"][g0:-(-r1 // LANES)], spec.in_features)
        if bool(((sign1[lo:lo + r1 - r0] | group[lo:lo + r1 - r0]) & ~keep).any()):
            raise ArbqError(f"{name}: codes hold sign or group bits at pruned positions (they must be 0)")

