"""The "uniform" packed layout: asymmetric k-bit integer codes per group of columns (the GPTQ baseline).

A weight W[i, j] (i < N rows = out_features, j < K columns = in_features) lies in column group
t = j // g (g = group size; the last group may be shorter, G = ceil(K/g) groups). With b-bit codes
q_ij ∈ {0 … 2^b − 1}, a scale s_it and a b-bit zero point z_it:

    Ŵ[i, j] = s_it · (q_ij − z_it)

With `keep` > 0 (the fit's `keep_columns`), k = round(keep·K) input columns j ∈ J are stored in full precision
instead (OWQ's "weak columns": the fit's most sensitive columns, processed last by GPTQ): Ŵ[:, J] = V, fp16. Their
codes are stored as 0 (and counted).

Packed tensors of one linear, stored under the module's name (e.g. `model.layers.0.mlp.down_proj.codes`):

    codes   uint8 [N, ceil(K·b/8)]   row bit stream, code of column j in bits j·b … j·b + b − 1, LSB first
    zeros   uint8 [N, ceil(G·b/8)]   zero points, the same bit stream over the row's groups
    scales  sd    [N, G]             scale per row and group (fp16 | bf16 | fp8 e4m3 | fp32)
    scales_scale fp32 [1]            per-tensor factor of fp8 scales (stored = value / factor)
    keep_idx int32 [k]               kept columns J, increasing (only when k > 0)
    keep_w  fp16  [N, k]             their weights V
    bias    dtype [N]                unbinarized bias, when the linear has one

Honest bits = 8·N·⌈K·b/8⌉ + 8·N·⌈G·b/8⌉ + N·G·sb + 32·k + 16·N·k: b + (b + sb)/g + 16·k/K per weight
(3-bit, g = 64, fp16: 3.30; 2-bit, g = 128, k/K = 0.5%: 2.22), the figure a binarizer must beat at equal storage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from arbq.errors import ArbqError
from arbq.packed.codec import PackedLinear, check_shapes, decode_scales, encode_scales
from arbq.packed.format import SCALE_DTYPES, pack_bits, param, scale_dtype_of, unpack_bits

BITS = (2, 3, 4, 8)
COMPONENTS = {"codes": "codes", "zeros": "zero_points", "scales": "scales", "scales_scale": "scales",
              "keep_idx": "kept_columns", "keep_w": "kept_columns", "bias": "bias"}
KEEP_DTYPE = torch.float16


def n_keep(keep: float, k: int) -> int:
    """Kept columns of a linear with k inputs for the recipe's fraction `keep` (< k)."""
    return min(int(round(keep * k)), k - 1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int [..., K] in 0..2^bits-1 -> uint8 [..., ceil(K·bits/8)]: code j in stream bits j·bits.. (LSB first)."""
    shifts = torch.arange(bits, device=codes.device)
    planes = (codes.long().unsqueeze(-1) >> shifts) & 1                  # [..., K, bits]
    return pack_bits(planes.reshape(*codes.shape[:-1], -1).bool())


def unpack_codes(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """uint8 [..., ceil(k·bits/8)] -> uint8 [..., k], inverse of pack_codes."""
    planes = unpack_bits(packed, k * bits).reshape(*packed.shape[:-1], k, bits).to(torch.uint8)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (planes * weights).sum(-1, dtype=torch.uint8)


@dataclass
class UniformResult:
    """The unpacked form of one linear W: [N, K] in this layout (what `binarize` writes to RUN/layers).

    codes: [N, K] uint8 (0..2^bits-1); scale: [N, G] float32 (already rounded to the scale dtype);
    zero: [N, G] uint8 (0..2^bits-1); bits, group: ints; keep_idx: [k] int64 increasing column indices kept in
    full precision, keep_w: [N, k] float32 (already rounded to fp16) their weights (None: no kept columns).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int
    keep_idx: torch.Tensor | None = None
    keep_w: torch.Tensor | None = None

    @property
    def n_keep(self) -> int:
        return 0 if self.keep_idx is None else int(self.keep_idx.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.codes": self.codes, f"{prefix}.scale": self.scale, f"{prefix}.zero": self.zero,
               f"{prefix}.bits_group": torch.tensor([self.bits, self.group], dtype=torch.int64)}
        if self.n_keep:
            out.update({f"{prefix}.keep_idx": self.keep_idx, f"{prefix}.keep_w": self.keep_w})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> UniformResult:
        try:
            bits, group = (int(v) for v in tensors[f"{prefix}.bits_group"].tolist())
            res = cls(tensors[f"{prefix}.codes"], tensors[f"{prefix}.scale"], tensors[f"{prefix}.zero"], bits, group,
                      tensors.get(f"{prefix}.keep_idx"), tensors.get(f"{prefix}.keep_w"))
        except (KeyError, ValueError) as e:
            raise ArbqError(f"uniform result for {prefix} is missing or has a malformed tensor {e}") from None
        res.validate(prefix)
        return res

    def validate(self, name: str = "linear") -> None:
        n, k = self.codes.shape
        g = -(-k // self.group) if self.group > 0 else -1
        if self.bits not in BITS or self.group < 1:
            raise ArbqError(f"{name}: bits {self.bits} / group {self.group} invalid")
        for key, shape in (("scale", (n, g)), ("zero", (n, g))):
            if tuple(getattr(self, key).shape) != shape:
                raise ArbqError(f"{name}: {key} has shape {tuple(getattr(self, key).shape)}, expected {shape}")
        top = (1 << self.bits) - 1
        if any(t.numel() and int(t.max()) > top for t in (self.codes, self.zero)):
            raise ArbqError(f"{name}: codes or zero points exceed {self.bits} bits")
        if (self.keep_idx is None) != (self.keep_w is None):
            raise ArbqError(f"{name}: kept columns need both keep_idx and keep_w")
        if self.n_keep:
            check_kept(self.keep_idx, k, name)
            if tuple(self.keep_w.shape) != (n, self.n_keep):
                raise ArbqError(f"{name}: keep_w has shape {tuple(self.keep_w.shape)}, expected {(n, self.n_keep)}")

    def to(self, device: str | torch.device) -> UniformResult:
        return UniformResult(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                                for f in fields(self)})

    def dequantize(self) -> torch.Tensor:
        """Ŵ: [N, K] float32 = s · (q − z), group t = j // g; kept columns Ŵ[:, J] = V."""
        k = self.codes.shape[1]
        t = torch.arange(k, device=self.codes.device) // self.group
        w = self.scale.float()[:, t] * (self.codes.float() - self.zero.float()[:, t])
        if self.n_keep:
            w[:, self.keep_idx.long()] = self.keep_w.float()
        return w


def check_kept(idx: torch.Tensor, k: int, name: str) -> None:
    """Kept-column indices must be integers, strictly increasing and < k (a corrupt file fails here, not later)."""
    if idx.dim() != 1 or idx.dtype.is_floating_point or (idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= k
                                                                         or bool((idx[1:] <= idx[:-1]).any()))):
        raise ArbqError(f"{name}: kept-column indices are not increasing integers in [0, {k})")


@dataclass(frozen=True)
class UniformSpec:
    """Shapes and bit counts of one linear in the "uniform" layout (the layout protocol, see
    arbq.packed.layouts)."""

    layout: ClassVar[str] = "uniform"
    out_features: int
    in_features: int
    bits: int
    group: int
    scale_dtype: str = "fp16"
    n_keep: int = 0

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group)

    def to_params(self) -> dict[str, Any]:
        out = {"out_features": self.out_features, "in_features": self.in_features, "bits": self.bits,
               "group": self.group, "scale_dtype": self.scale_dtype}
        return out | ({"n_keep": self.n_keep} if self.n_keep else {})

    @classmethod
    def from_params(cls, params: dict, where: str = "uniform module") -> UniformSpec:
        pos = lambda v: v > 0  # noqa: E731
        k = param(params, "in_features", int, where, pos)
        keep = param({"n_keep": 0} | params, "n_keep", int, where, lambda v: 0 <= v < k, "in [0, in_features)")
        return cls(param(params, "out_features", int, where, pos), k,
                   param(params, "bits", int, where, lambda v: v in BITS, f"one of {BITS}"),
                   param(params, "group", int, where, pos),
                   param(params, "scale_dtype", str, where, lambda v: v in SCALE_DTYPES), keep)

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        n, b, u8 = self.out_features, self.bits, torch.uint8
        out = {"codes": ((n, -(-self.in_features * b // 8)), u8), "zeros": ((n, -(-self.n_groups * b // 8)), u8),
               "scales": ((n, self.n_groups), scale_dtype_of(self.scale_dtype))}
        if self.scale_dtype == "fp8":
            out["scales_scale"] = ((1,), torch.float32)
        if self.n_keep:
            out.update({"keep_idx": ((self.n_keep,), torch.int32), "keep_w": ((n, self.n_keep), KEEP_DTYPE)})
        return out

    def formula_bits(self, bias_bits: int = 0) -> dict[str, int]:
        """codes 8·N·⌈K·b/8⌉, zero points 8·N·⌈G·b/8⌉, scales N·G·sb (+32 for the fp8 factor), kept columns
        32·k + 16·N·k."""
        n, b = self.out_features, self.bits
        sb = torch.finfo(scale_dtype_of(self.scale_dtype)).bits
        return {"codes": 8 * n * -(-self.in_features * b // 8), "zero_points": 8 * n * -(-self.n_groups * b // 8),
                "scales": n * self.n_groups * sb + (32 if self.scale_dtype == "fp8" else 0),
                "kept_columns": 32 * self.n_keep + 16 * n * self.n_keep, "bias": bias_bits}

    def paper_bits(self) -> int:
        """The usual "b-bit" label: the codes only."""
        return self.out_features * self.in_features * self.bits

    @staticmethod
    def component(suffix: str) -> str:
        return COMPONENTS[suffix]

    def describe(self) -> str:
        return (f"layout=uniform, bits={self.bits}, group={self.group}, scale_dtype={self.scale_dtype}"
                + (f", kept columns={self.n_keep}" if self.n_keep else ""))


def pack(res: UniformResult, params: dict, scale_dtype: str, name: str = "linear") -> PackedLinear:
    """Pack a UniformResult; params {"bits", "group", "keep"} from the recipe must match what the fit wrote."""
    n, k = res.shape
    want = (params["bits"], params["group"], n_keep(params.get("keep", 0.0), k))
    if (res.bits, res.group, res.n_keep) != want:
        raise ArbqError(f"{name}: result has bits {res.bits} / group {res.group} / {res.n_keep} kept columns, the "
                        f"recipe says {want[0]} / {want[1]} / {want[2]}")
    res.validate(name)
    spec = UniformSpec(n, k, res.bits, res.group, scale_dtype, res.n_keep)
    out = {"codes": pack_codes(res.codes, res.bits), "zeros": pack_codes(res.zero, res.bits)}
    out.update(encode_scales(res.scale, scale_dtype, "scales"))
    if res.n_keep:
        out.update({"keep_idx": res.keep_idx.to(torch.int32), "keep_w": res.keep_w.to(KEEP_DTYPE)})
    return PackedLinear(spec, {key: t.contiguous() for key, t in out.items()})


def dequantize_rows(p: PackedLinear, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of Ŵ, fp32 [r1 − r0, K]."""
    spec = p.spec
    kept = (p["keep_idx"], p["keep_w"][r0:r1]) if spec.n_keep else (None, None)
    res = UniformResult(unpack_codes(p["codes"][r0:r1], spec.in_features, spec.bits),
                        decode_scales(p.tensors, "scales")[r0:r1],
                        unpack_codes(p["zeros"][r0:r1], spec.n_groups, spec.bits), spec.bits, spec.group, *kept)
    return res.dequantize()


def validate(p: PackedLinear, name: str = "linear") -> None:
    """Shapes and dtypes of every tensor (codec.check_shapes) and the kept-column indices."""
    check_shapes(p, name)
    if p.spec.n_keep:
        check_kept(p["keep_idx"], p.spec.in_features, name)
