"""The "binary_nm" packed layout: N:M semi-structured-pruned binarized linears (PBS²P / STBLLM style).

A fit prunes W: [N, K] (N rows = out_features, K columns = in_features) so that every run of m consecutive
columns [g·m, g·m + m) of a row keeps exactly n weights (a last partial run of r < m columns keeps min(n, r)),
and binarizes the kept ones with a binary-family scheme (arbq.methods.result.LinearResult, arbq.packed.format).
With keep[i, j] ∈ {0, 1}:

    Ŵ[i, j] = keep[i, j] · Ŵ_binary[i, j]          (exact zeros at pruned positions)

Every row keeps exactly L = n·⌊K/m⌋ + min(n, K mod m) weights. Packed tensors of one linear (bit planes LSB
first along their last dimension, like every plane of arbq.packed.format):

    keep    uint8 [N, ceil(K/8)]   occupancy plane (1 = kept), one bit per column
    sign1   uint8 [N, ceil(L/8)]   compacted: the first sign bits of the row's kept columns, in column order
    group   uint8 [N, ceil(L/8)]   compacted the same way (schemes with a group bit)
    salient, sign2, values, colscale_ns, colscale_sal, *_scale: as in the "binary" layout, unchanged (sign2
            [N, ceil(S/8)] holds the second sign of every salient column, pruned or not: not compacted)

    run_order int16 [⌊K/m⌋]    only with params run_order: true (nm_act_order): the model's run of every stored
            run of m columns; every plane above then holds the columns in that order (a last partial run stays
            last), and Ŵ[:, π] = the stored Ŵ with π = order_columns(run_order); kernels read x[..., π]

Dense plane = expand(compact, keep): bit j of a row is the next compact bit where keep is 1, else 0. For m = 8
every 64 columns (8 runs) take exactly n bytes of a compact row, so a kernel expands them with one
`_pdep_u64(compact_bits, keep_bits)` per 64 columns (arbq/kernels/binary_gemv.cpp, expand_row).

Params (`quantization_config.modules[name].params`): the binary layout's plus n and m (1 ≤ n ≤ m ≤ 16), and
run_order: true when the run order is stored.

Honest bits = the binary layout's formula with sign = 8·N·⌈L/8⌉ and group_bit = 8·N·⌈L/8⌉ (when stored), plus
nm_positions 8·N·⌈K/8⌉ (and run_order 16·⌊K/m⌋). The arithmetic of spec/pbs2p.md §5, per group of 8 weights with n kept:

    this layout: bitmap + compacted signs (+ group bits)   8 + n (+ n) bits → signs + positions 1.50 (4:8),
                                                            1.625 (5:8), 1.75 (6:8) b/w; group bits n/8 more
    one joint code of C(8, n)·2^n ≤ 1792 states            11 bits → 1.375 b/w for every n (not built)
    entropy bound log2 C(8, n) + n                         10.13 / 10.81 / 10.81 bits → 1.27 / 1.35 / 1.35

The papers' "0.55–0.80 bits" are `paper_bits`: n/m × (sign + residual bits), nothing for positions. Kernels:
the torch backend (dequantize_rows) and the C++ CPU kernel (arbq.kernels.cpu) run this layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from arbq.errors import ArbqError
from arbq.methods.result import LinearResult
from arbq.packed import codec
from arbq.packed.codec import PackedLinear, check_shapes
from arbq.packed.format import COMPONENTS, BinaryBased, LinearSpec, Scheme, pack_bits, param, unpack_bits
from arbq.packed.order import ORDER, check_order, in_model_order, order_bits, order_columns, order_shape

M_MAX = 16
KEEP = "keep"              # the occupancy plane's suffix
COMPACT = ("sign1", "group")   # planes stored compacted (kept positions only)
NM_COMPONENTS = {KEEP: "nm_positions"}   # honest-bits components of the N:M-only tensors (run_order: COMPONENTS)
ROWS = 1024                # rows per tile when checking a whole plane


def nm_counts_ok(keep: torch.Tensor, n: int, m: int) -> bool:
    """True iff keep [..., K] (bool, True = kept) holds exactly n kept entries in every run of m consecutive
    columns [g·m, g·m + m) of every row, and min(n, r) in a last partial run of r < m columns."""
    k = keep.shape[-1]
    full = k - k % m
    rows = keep.reshape(-1, k)
    if full and not bool((rows[:, :full].reshape(rows.shape[0], -1, m).sum(-1) == n).all()):
        return False
    return full == k or bool((rows[:, full:].sum(-1) == min(n, k - full)).all())


def kept_per_row(k: int, n: int, m: int) -> int:
    """L = n·⌊K/m⌋ + min(n, K mod m): weights every row of an n:m-pruned [N, K] matrix keeps."""
    return n * (k // m) + min(n, k % m)


def compact_plane(bits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """bool bits [R, K], keep [R, K] (every row the same count L of kept) -> uint8 [R, ceil(L/8)]: each row's
    bits at kept positions, in column order, packed LSB first."""
    return pack_bits(bits[keep].reshape(bits.shape[0], -1))


def expand_plane(compact: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inverse of compact_plane: uint8 [R, ceil(L/8)], keep bool [R, K] -> bool [R, K], False where pruned."""
    rows = keep.shape[0]
    dense = torch.zeros_like(keep)
    dense[keep] = unpack_bits(compact, int(keep.sum()) // rows if rows else 0).reshape(-1)
    return dense


def _check_nm(n: Any, m: Any, name: str) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 1 <= n <= m <= M_MAX:
        raise ArbqError(f"{name}: N:M pattern {n}:{m} invalid (need integers 1 <= n <= m <= {M_MAX})")


def _masked(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """w with exact zeros where keep is False."""
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


@dataclass
class NMResult:
    """The unpacked form of one N:M-pruned binarized linear W: [N, K] (what `binarize` writes to RUN/layers).

    base: the binarization of the kept entries (its values at pruned positions are arbitrary);
    keep: [N, K] bool, True = kept, n of every m consecutive columns of a row (see nm_counts_ok); n, m: ints;
    order: None (columns in the model's order) or int64 [⌊K/m⌋], the run order of nm_act_order: base and keep
    hold the columns order_columns(order) (see the module docstring).
    """

    base: LinearResult
    keep: torch.Tensor
    n: int
    m: int
    order: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    @property
    def salient(self) -> torch.Tensor:
        return self.base.salient

    @property
    def blocksize(self) -> int:
        return self.base.blocksize

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        order = {} if self.order is None else {f"{prefix}.{ORDER}": self.order}
        return {**self.base.to_tensors(prefix), f"{prefix}.{KEEP}": self.keep,
                f"{prefix}.nm": torch.tensor([self.n, self.m], dtype=torch.int64), **order}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> NMResult:
        order = tensors.get(f"{prefix}.{ORDER}")           # the N:M result's run order (of m), not the base's
        base = LinearResult.from_tensors({k: v for k, v in tensors.items() if k != f"{prefix}.{ORDER}"}, prefix)
        try:
            nm, keep = tensors[f"{prefix}.nm"], tensors[f"{prefix}.{KEEP}"]
            if nm.numel() != 2 or nm.dtype.is_floating_point or nm.dtype == torch.bool:
                raise ValueError(f"{prefix}.nm")
            n, m = (int(v) for v in nm.reshape(-1).tolist())
        except (KeyError, ValueError) as e:
            raise ArbqError(f"N:M result for {prefix} is missing or has a malformed tensor {e}") from None
        res = cls(base, keep, n, m, order)
        res.validate(prefix)
        return res

    def to(self, device: str | torch.device) -> NMResult:
        return NMResult(self.base.to(device), self.keep.to(device), self.n, self.m,
                        None if self.order is None else self.order.to(device))

    def validate(self, name: str = "linear") -> None:
        """Raise ArbqError (one line) unless the base is consistent, keep is a bool [N, K], N:M holds and the run
        order (if any) is a permutation of the runs."""
        self.base.validate(name)
        _check_nm(self.n, self.m, name)
        if self.keep.dtype != torch.bool or tuple(self.keep.shape) != self.shape:
            raise ArbqError(f"{name}: keep is {self.keep.dtype} {tuple(self.keep.shape)}, expected torch.bool "
                            f"{self.shape}")
        if not nm_counts_ok(self.keep, self.n, self.m):
            raise ArbqError(f"{name}: keep mask is not {self.n}:{self.m} (every {self.m} consecutive columns of a "
                            f"row must keep {self.n})")
        if self.order is not None:
            check_order(self.order, self.shape[1], self.m, name)

    def dequantize(self) -> torch.Tensor:
        """Ŵ: [N, K] float32 = base.dequantize() · keep, exact zeros at pruned positions, in the model's column
        order."""
        cols = None if self.order is None else order_columns(self.order, self.m, self.shape[1])
        return in_model_order(_masked(self.base.dequantize(), self.keep), cols)

    def tunable(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The base binarization's tunable values (LinearResult.tunable); the mask stays."""
        return self.base.tunable()

    def with_values(self, values: dict[str, torch.Tensor]) -> NMResult:
        return NMResult(self.base.with_values(values), self.keep, self.n, self.m, self.order)


@dataclass(frozen=True)
class NMSpec(BinaryBased):
    """Shapes and bit counts of one linear in the "binary_nm" layout (the layout protocol, see
    arbq.packed.layouts): the binary layout's fields (`binary` is that LinearSpec: the spec of every tensor
    but the occupancy plane) plus the N:M pattern and whether a run order is stored (`ordered`)."""

    layout: ClassVar[str] = "binary_nm"
    n: int
    m: int
    ordered: bool = False

    @classmethod
    def of(cls, binary: LinearSpec, n: int, m: int, ordered: bool = False) -> NMSpec:
        return cls(*cls.fields_of(binary), n, m, ordered)

    @property
    def run_length(self) -> int:
        """m: the columns of a run, the unit of the run order (arbq.packed.order)."""
        return self.m

    @property
    def kept(self) -> int:
        """L: weights kept per row (kept_per_row); the compacted planes are [N, ceil(L/8)]."""
        return kept_per_row(self.in_features, self.n, self.m)

    def to_params(self) -> dict[str, Any]:
        return {**self.binary.to_params(), "n": self.n, "m": self.m, **({"run_order": True} if self.ordered else {})}

    @classmethod
    def from_params(cls, params: dict, where: str = "binary_nm module") -> NMSpec:
        """The spec of a `quantization_config.modules` entry's params, every value type- and range-checked."""
        binary = LinearSpec.from_params(params, where)
        m = param(params, "m", int, where, lambda v: 1 <= v <= M_MAX, f"1 <= m <= {M_MAX}")
        n = param(params, "n", int, where, lambda v: 1 <= v <= m, "1 <= n <= m")
        ordered = param(params, "run_order", bool, where) if "run_order" in params else False
        return cls.of(binary, n, m, ordered)

    def tensor_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The binary layout's tensors with sign1 (and group) compacted to uint8 [N, ceil(L/8)], plus the
        occupancy plane keep uint8 [N, ceil(K/8)] (and run_order int16 [⌊K/m⌋] when ordered)."""
        out = self.binary.tensor_shapes()
        for name in COMPACT:
            if name in out:
                out[name] = ((self.out_features, -(-self.kept // 8)), torch.uint8)
        return {**out, KEEP: ((self.out_features, -(-self.in_features // 8)), torch.uint8), **order_shape(self)}

    def formula_bits(self, bias_bits: int = 0) -> dict[str, int]:
        """The binary layout's components with sign (and group_bit) 8·N·⌈L/8⌉ (compacted planes), plus
        nm_positions 8·N·⌈K/8⌉ (and run_order 16·⌊K/m⌋ when ordered)."""
        out = self.binary.formula_bits(bias_bits)
        bias = out.pop("bias")
        compact = 8 * self.out_features * -(-self.kept // 8)
        out["sign"] = compact
        out["group_bit"] = compact if self.scheme.group else 0
        return {**out, "nm_positions": 8 * self.out_features * -(-self.in_features // 8),
                **order_bits(self), "bias": bias}

    def paper_bits(self) -> int:
        """The papers' convention (STBLLM, PBS²P): n/m × (sign + salient residual bits), rounded half up;
        nothing for the positions."""
        return (2 * self.n * self.binary.paper_bits() + self.m) // (2 * self.m)

    @staticmethod
    def component(suffix: str) -> str:
        return NM_COMPONENTS.get(suffix) or COMPONENTS[suffix]

    def describe(self) -> str:
        return f"layout=binary_nm, n:m={self.n}:{self.m}{', run order' if self.ordered else ''}, " + \
            self.binary.describe().removeprefix("layout=binary, ")


ROW_TENSORS = ("sign2", "values")   # binary-layout tensors indexed by row (besides the compacted planes)


def binary_rows(p: PackedLinear, r0: int, r1: int,
                expand: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> PackedLinear:
    """Rows r0:r1 as a "binary" layout PackedLinear with dense sign1/group planes (expanded, 0 where pruned).
    expand(compact rows, keep rows) -> packed dense rows, both planes packed as stored (default: expand_plane
    in torch; the CPU kernel passes its pdep expansion)."""
    spec = p.spec
    keep = p[KEEP][r0:r1]
    if expand is None:
        keep_bits = unpack_bits(keep, spec.in_features)           # once for both planes

        def expand(compact: torch.Tensor, _keep: torch.Tensor) -> torch.Tensor:
            return pack_bits(expand_plane(compact, keep_bits))
    t = dict(p.tensors)
    t.pop(KEEP)
    t.pop(ORDER, None)
    for name in COMPACT:
        if name in t:
            t[name] = expand(p[name][r0:r1], keep)
    for name in ROW_TENSORS:
        if name in t:
            t[name] = t[name][r0:r1]
    return PackedLinear(replace(spec.binary, out_features=r1 - r0), t)


def check_representable(res: NMResult, scheme: Scheme, name: str, rows: int = ROWS) -> None:
    """Raise ArbqError if the slots `scheme` stores do not reproduce res.dequantize() exactly at the kept
    positions (codec.check_representable, restricted to them: pruned positions may hold anything)."""
    packed = codec.pack_linear(res.base, scheme, "fp32")
    b, n = res.base, res.shape[0]
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        sub = LinearResult(b.sign1[r0:r1], b.sign2[r0:r1], b.group[r0:r1], b.salient, b.alpha[r0:r1],
                           b.mu[r0:r1], b.col_scale, b.blocksize)
        keep = res.keep[r0:r1]
        want = _masked(sub.dequantize(), keep)
        got = _masked(codec.unpack_rows(packed, r0, r1).dequantize(), keep)
        tol = 1e-6 * float(want.abs().max()) if want.numel() else 0.0
        err = float((got - want).abs().max()) if want.numel() else 0.0
        if not err <= tol:
            raise ArbqError(f"{name}: the binarization result uses slots that its method's packed format does "
                            f"not store (max error {err:.3g} at kept positions after packing)")


def pack(res: NMResult, params: dict, scale_dtype: str, name: str = "linear") -> PackedLinear:
    """Pack an NMResult; params {"rc", "salient", "group", "cgb", "blocksize", "n", "m"} from the recipe must
    match what the fit wrote."""
    if (params["n"], params["m"]) != (res.n, res.m):
        raise ArbqError(f"{name}: result is {res.n}:{res.m} sparse, the recipe says {params['n']}:{params['m']}")
    if res.blocksize != params["blocksize"]:
        raise ArbqError(f"{name}: result blocksize {res.blocksize} does not match the recipe's {params['blocksize']}")
    res.validate(name)
    scheme = Scheme.from_params(params)
    check_representable(res, scheme, name)
    p = codec.pack_linear(res.base, scheme, scale_dtype)
    k = res.shape[1]
    planes = {plane: compact_plane(unpack_bits(p[plane], k), res.keep).contiguous()
              for plane in COMPACT if plane in p.tensors}
    order = {} if res.order is None else {ORDER: res.order.to(torch.int16).contiguous()}
    return PackedLinear(NMSpec.of(p.spec, res.n, res.m, res.order is not None),
                        {**p.tensors, **planes, KEEP: pack_bits(res.keep).contiguous(), **order})


def dequantize_rows(p: PackedLinear, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of Ŵ, fp32 [r1 − r0, K]: the binary rows from the expanded planes, zero where pruned, columns
    in the stored order (what the kernels multiply with x[..., π]; layouts.dequantize puts them in the model's)."""
    w = codec.unpack_rows(binary_rows(p, r0, r1)).dequantize()
    return _masked(w, unpack_bits(p[KEEP][r0:r1], p.spec.in_features))


def validate(p: PackedLinear, name: str = "linear") -> None:
    """Shapes and dtypes of every tensor (codec.check_shapes: compacted planes [N, ceil(L/8)]), the binary checks
    (salient bitmap count), the run order (a permutation) and the N:M pattern of the occupancy plane."""
    check_shapes(p, name)
    spec = p.spec
    if spec.ordered:
        check_order(p[ORDER], spec.in_features, spec.m, name)
    if spec.scheme.salient:
        n_sal = int(unpack_bits(p["salient"], spec.in_features).sum())
        if n_sal != spec.n_salient:
            raise ArbqError(f"{name}: salient bitmap marks {n_sal} columns, the config says {spec.n_salient}")
    for r0 in range(0, spec.out_features, ROWS):
        if not nm_counts_ok(unpack_bits(p[KEEP][r0:r0 + ROWS], spec.in_features), spec.n, spec.m):
            raise ArbqError(f"{name}: the keep plane is not {spec.n}:{spec.m} (every {spec.m} consecutive columns "
                            f"of a row must keep {spec.n})")
