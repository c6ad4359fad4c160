"""The "binary" packed layout: bit planes, which slots a method stores, tensor shapes, bit counts.

Its tensors are the same in format versions 1 and 2 (version 2 only moved the per-model
method/cgb/blocksize/scale_dtype of `quantization_config` into one params entry per module, see
arbq.packed.layouts); the other layouts live in their own modules (arbq.packed.uniform).

Bit planes are packed along K (in_features), LSB first: bit j of byte g is column 8g + j, each row
ceil(K/8) bytes, padding bits 0 (numpy `packbits(..., bitorder="little")`).

Per binarized linear W: [N, K] (block size B, T = ceil(K/B) blocks, S salient columns), stored under
the module's name, e.g. `model.layers.0.self_attn.q_proj.sign1`:

    sign1        uint8 [N, ceil(K/8)]   first sign bit (1 = +1)
    group        uint8 [N, ceil(K/8)]   group bit; full plane. Without CGB the bits of salient
                                        columns are stored as 0 (and still counted: 1 bit/weight)
    salient      uint8 [ceil(K/8)]      salient-column bitmap
    sign2        uint8 [N, ceil(S/8)]   second sign, salient columns only, in column order
    values       sd    [N, T, V]        alpha / mu of the V slots the method uses (Scheme.value_slots)
    colscale_ns  sd    [C0, K - S]      RC column scales of non-salient columns, slots Scheme.cs_ns_slots
    colscale_sal sd    [C1, S]          RC column scales of salient columns, slots Scheme.cs_sal_slots
    *_scale      fp32  [1]              per-tensor factor of an fp8 tensor (stored = value / factor)
    bias         dtype [N]              unbinarized bias, when the linear has one
    run_order    int16 [⌊K/8⌋]          only with params run_order: true (the recipe key run_order): the model's
                                        run of 8 columns held by every stored run; every tensor above then
                                        holds the columns in that order (arbq.packed.order), kernels read x[..., π]

`sd` is the scale dtype (fp16 | bf16 | fp8 e4m3 | fp32). Slots a method never uses are not stored;
unpacking fills them with 0 (mu, unused alpha) or 1 (column scales of non-RC methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from arbq import dtypes
from arbq.errors import ArbqError
from arbq.packed.order import ORDER, RUN, order_bits, order_shape

FORMAT_VERSION = 2     # 2: quantization_config holds one {layout, method, params} entry per module
QUANT_METHOD = "arbq"
BIT_ORDER = "little"

SCALE_DTYPES: dict[str, torch.dtype] = {k: dtypes.BY_NAME[k] for k in ("fp16", "bf16", "fp8", "fp32")}
FP8_MAX = 448.0

# tensor suffix -> size-report component
COMPONENTS: dict[str, str] = {
    "sign1": "sign", "sign2": "second_sign", "group": "group_bit", "salient": "salient_bitmap",
    "values": "row_values", "values_scale": "row_values",
    "colscale_ns": "col_scales", "colscale_ns_scale": "col_scales",
    "colscale_sal": "col_scales", "colscale_sal_scale": "col_scales", "bias": "bias", ORDER: ORDER,
}
COMPONENT_ORDER = ("sign", "second_sign", "group_bit", "salient_bitmap", "row_values", "col_scales", "bias")

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., K] -> uint8 [..., ceil(K/8)]; bit j of byte g is element 8g + j (LSB first)."""
    k = bits.shape[-1]
    pad = -k % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)) if pad else bits.to(torch.uint8)
    b = b.reshape(*bits.shape[:-1], (k + pad) // 8, 8)
    return (b << _SHIFTS.to(b.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., G] -> bool [..., k] (k <= 8G), inverse of pack_bits."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :k].bool()


@dataclass(frozen=True)
class Scheme:
    """Which (kind, group, order) slots of a LinearResult a method uses.

    rc:      column scales, no means (else means, column scales ≡ 1)
    salient: salient columns exist (second sign, bitmap, kind-1 values)
    group:   a group bit splits non-salient columns
    cgb:     a group bit splits salient columns too
    """

    rc: bool
    salient: bool
    group: bool
    cgb: bool

    @classmethod
    def from_params(cls, params: dict) -> Scheme:
        """The scheme of a method's layout params (its rc, salient, group and cgb flags; other keys ignored)."""
        return cls(**{f: params[f] for f in ("rc", "salient", "group", "cgb")})

    def groups(self, kind: int) -> tuple[int, ...]:
        return (0, 1) if (self.group if kind == 0 else self.cgb) else (0,)

    @property
    def kinds(self) -> tuple[int, ...]:
        return (0, 1) if self.salient else (0,)

    @property
    def alpha_slots(self) -> tuple[tuple[int, int, int], ...]:
        """(kind, group, order) of every stored alpha; order 1 exists in salient columns only."""
        return tuple((k, g, o) for k in self.kinds for g in self.groups(k) for o in range(k + 1))

    @property
    def mu_slots(self) -> tuple[tuple[int, int], ...]:
        return () if self.rc else tuple((k, g) for k in self.kinds for g in self.groups(k))

    @property
    def n_values(self) -> int:
        """V: values per row and block (alphas first, then means)."""
        return len(self.alpha_slots) + len(self.mu_slots)

    @property
    def cs_ns_slots(self) -> tuple[tuple[int, int], ...]:
        """(group, order) column scales stored for non-salient columns (RC only)."""
        return tuple((g, 0) for g in self.groups(0)) if self.rc else ()

    @property
    def cs_sal_slots(self) -> tuple[tuple[int, int], ...]:
        return tuple((g, o) for g in self.groups(1) for o in (0, 1)) if self.rc and self.salient else ()


def scale_dtype_of(name: str) -> torch.dtype:
    try:
        return SCALE_DTYPES[name]
    except KeyError:
        raise ArbqError(f"unknown scale dtype {name!r}; choose one of: {', '.join(SCALE_DTYPES)}") from None


def param(params: dict, key: str, kind: type, where: str, ok: Any = None, why: str = "") -> Any:
    """params[key] checked to be a `kind` (bool is not an int) and to satisfy `ok`, else a one-line ArbqError."""
    if not isinstance(params, dict) or key not in params:
        raise ArbqError(f"{where}: missing {key!r}")
    v = params[key]
    if isinstance(v, bool) != (kind is bool) or not isinstance(v, kind) or (ok is not None and not ok(v)):
        raise ArbqError(f"{where}: {key} = {v!r} is not a valid value{': ' + why if why else ''}")
    return v


@dataclass(frozen=True)
class LinearSpec:
    """Everything needed to interpret one linear's packed tensors in the "binary" layout: W is
    [out_features, in_features]. The layout protocol (arbq.packed.layouts): `layout`, `to_params`,
    `from_params`, `tensor_shapes`, `formula_bits`, `paper_bits`, `component`, `describe`. ordered: the columns
    are stored in runs of 8 in another order (the run_order tensor, arbq.packed.order)."""

    layout: ClassVar[str] = "binary"
    out_features: int
    in_features: int
    n_salient: int
    blocksize: int
    scheme: Scheme
    scale_dtype: str = "fp16"
    ordered: bool = False

    @property
    def n_blocks(self) -> int:
        return -(-self.in_features // self.blocksize)

    @property
    def run_length(self) -> int:
        """The columns of a run of the run order (arbq.packed.order)."""
        return RUN

    def to_params(self) -> dict[str, Any]:
        sc = self.scheme
        return {"out_features": self.out_features, "in_features": self.in_features, "n_salient": self.n_salient,
                "blocksize": self.blocksize, "rc": sc.rc, "salient": sc.salient, "group": sc.group, "cgb": sc.cgb,
                "scale_dtype": self.scale_dtype, **({ORDER: True} if self.ordered else {})}

    @classmethod
    def from_params(cls, params: dict, where: str = "binary module") -> LinearSpec:
        """The spec of a `quantization_config.modules` entry's params, every value type- and range-checked."""
        pos = lambda v: v > 0  # noqa: E731
        n, k = param(params, "out_features", int, where, pos), param(params, "in_features", int, where, pos)
        s = param(params, "n_salient", int, where, lambda v: 0 <= v <= k, "0 <= n_salient <= in_features")
        b = param(params, "blocksize", int, where, pos)
        flags = {f: param(params, f, bool, where) for f in ("rc", "salient", "group", "cgb")}
        sd = param(params, "scale_dtype", str, where, lambda v: v in SCALE_DTYPES, f"one of {', '.join(SCALE_DTYPES)}")
        ordered = param(params, ORDER, bool, where) if ORDER in params else False
        return cls(n, k, s, b, Scheme(**flags), sd, ordered)

    def formula_bits(self, bias_bits: int = 0) -> dict[str, int]:
        return formula_bits(self, bias_bits)

    def paper_bits(self) -> int:
        return paper_bits(self)

    @staticmethod
    def component(suffix: str) -> str:
        return COMPONENTS[suffix]

    def describe(self) -> str:
        sc = self.scheme
        return (f"layout=binary, n_salient={self.n_salient}, blocksize={self.blocksize}, rc={sc.rc}, cgb={sc.cgb}, "
                f"scale_dtype={self.scale_dtype}{', run order' if self.ordered else ''}")

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """suffix -> (shape, dtype) of every packed tensor this linear stores (bias excluded)."""
        n, k, s, sc = self.out_features, self.in_features, self.n_salient, self.scheme
        kb, sd, u8 = -(-k // 8), scale_dtype_of(self.scale_dtype), torch.uint8
        out = {"sign1": ((n, kb), u8)}
        if sc.group:
            out["group"] = ((n, kb), u8)
        if sc.salient:
            out["salient"] = ((kb,), u8)
            out["sign2"] = ((n, -(-s // 8)), u8)
        out["values"] = ((n, self.n_blocks, sc.n_values), sd)
        scaled = ["values"]
        if sc.rc:
            out["colscale_ns"] = ((len(sc.cs_ns_slots), k - s), sd)
            out["colscale_sal"] = ((len(sc.cs_sal_slots), s), sd)
            scaled += ["colscale_ns", "colscale_sal"]
        if self.scale_dtype == "fp8":
            out.update({f"{name}_scale": ((1,), torch.float32) for name in scaled})
        return {**out, **order_shape(self)}


@dataclass(frozen=True)
class BinaryBased:
    """The binary LinearSpec's fields, for the layouts that store the binary scheme's bits another way
    (arbq.packed.nm's binary_nm, arbq.packed.lut's binary_lut): their spec classes extend it."""

    out_features: int
    in_features: int
    n_salient: int
    blocksize: int
    scheme: Scheme
    scale_dtype: str

    @staticmethod
    def fields_of(spec: Any) -> tuple:
        """The six binary fields of a LinearSpec (or of any BinaryBased), in order."""
        return (spec.out_features, spec.in_features, spec.n_salient, spec.blocksize, spec.scheme, spec.scale_dtype)

    @property
    def binary(self) -> LinearSpec:
        """The spec of the same linear in the binary layout."""
        return LinearSpec(*self.fields_of(self))

    @property
    def n_blocks(self) -> int:
        return self.binary.n_blocks


def formula_bits(spec: LinearSpec, bias_bits: int = 0) -> dict[str, int]:
    """Closed-form bits per component for one linear (must equal `measured_bits` of what is written).

        sign           8·N·⌈K/8⌉
        second_sign    8·N·⌈S/8⌉                        (salient methods)
        group_bit      8·N·⌈K/8⌉                        (methods with a group bit; full plane)
        salient_bitmap 8·⌈K/8⌉
        row_values     N·T·V·sb (+ 32 for the fp8 factor)
        col_scales     (C0·(K−S) + C1·S)·sb (+ 2·32 for fp8)   (RC)
        run_order      16·⌊K/8⌋                         (only when the spec is ordered)
    """
    n, k, s, sc = spec.out_features, spec.in_features, spec.n_salient, spec.scheme
    sb = torch.finfo(scale_dtype_of(spec.scale_dtype)).bits
    fp8 = spec.scale_dtype == "fp8"
    row_bits = 8 * n * (-(-k // 8))
    return {
        "sign": row_bits,
        "second_sign": 8 * n * (-(-s // 8)) if sc.salient else 0,
        "group_bit": row_bits if sc.group else 0,
        "salient_bitmap": 8 * (-(-k // 8)) if sc.salient else 0,
        "row_values": n * spec.n_blocks * sc.n_values * sb + (32 if fp8 else 0),
        "col_scales": ((len(sc.cs_ns_slots) * (k - s) + len(sc.cs_sal_slots) * s) * sb + (64 if fp8 else 0))
        if sc.rc else 0,
        **order_bits(spec),
        "bias": bias_bits,
    }


def measured_bits(tensors: dict[str, torch.Tensor], spec: Any = None) -> dict[str, int]:
    """Bits per component of the tensors actually written for one linear (keys are suffixes); components
    named by `spec.component` (the binary layout's when no spec is given), in the spec's formula order."""
    component = spec.component if spec is not None else COMPONENTS.__getitem__
    out = dict.fromkeys(spec.formula_bits() if spec is not None else COMPONENT_ORDER, 0)
    for name, t in tensors.items():
        c = component(name)
        out[c] = out.get(c, 0) + t.numel() * t.element_size() * 8
    return out


def paper_bits(spec: LinearSpec) -> int:
    """The papers' convention: sign bit of every weight plus the residual bit of salient columns."""
    return spec.out_features * (spec.in_features + (spec.n_salient if spec.scheme.salient else 0))
