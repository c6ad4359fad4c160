"""LinearResult <-> packed tensors of one linear in the "binary" layout (arbq.packed.format)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from arbq.errors import ArbqError
from arbq.methods.result import LinearResult
from arbq.packed.format import FP8_MAX, LinearSpec, Scheme, pack_bits, scale_dtype_of, unpack_bits
from arbq.packed.order import ORDER, check_order, stored_order


@dataclass
class PackedLinear:
    """The packed tensors of one linear (suffix -> tensor, bias excluded) and how to read them: `spec`
    is the layout's spec (LinearSpec for "binary", arbq.packed.uniform.UniformSpec, ...)."""

    spec: Any
    tensors: dict[str, torch.Tensor]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def encode_scales(x: torch.Tensor, scale_dtype: str, name: str) -> dict[str, torch.Tensor]:
    """fp32 values -> {name: stored} (+ {name_scale: fp32 [1]} for fp8, stored = x / factor)."""
    dt = scale_dtype_of(scale_dtype)
    x = x.float()
    if not torch.isfinite(x).all():
        raise ArbqError(f"{name}: non-finite scale values cannot be packed")
    if scale_dtype == "fp8":
        amax = float(x.abs().max()) if x.numel() else 0.0
        factor = amax / FP8_MAX if amax > 0 else 1.0
        return {name: (x / factor).to(dt), f"{name}_scale": torch.tensor([factor], dtype=torch.float32)}
    out = x.to(dt)
    if not torch.isfinite(out).all():
        raise ArbqError(f"{name}: values overflow {scale_dtype}; use --scale-dtype bf16")
    return {name: out}


def decode_scales(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Inverse of encode_scales: fp32 values."""
    x = tensors[name].float()
    scale = tensors.get(f"{name}_scale")
    return x * scale.float() if scale is not None else x


def check_shapes(p: PackedLinear, name: str = "linear") -> None:
    """Raise ArbqError unless every tensor of any layout's spec is present with its shape, uint8 planes as uint8."""
    for key, (shape, dt) in p.spec.tensor_shapes().items():
        t = p.tensors.get(key)
        if t is None or tuple(t.shape) != shape or (dt == torch.uint8 and t.dtype != dt):
            raise ArbqError(f"{name}.{key}: expected {dt} {shape}, got "
                            f"{None if t is None else (t.dtype, tuple(t.shape))}")


def validate_packed(p: PackedLinear, name: str = "linear") -> None:
    """Raise ArbqError unless the tensors have the spec's shapes, bit planes are uint8, and the salient
    bitmap marks exactly n_salient columns (the kernels index compacted planes by it). Scales may have
    been cast to another float dtype (transformers does that); kernels read whatever they hold."""
    check_shapes(p, name)
    if (order := stored_order(p)) is not None:
        check_order(order, p.spec.in_features, p.spec.run_length, name)
    if p.spec.scheme.salient:
        n_sal = int(unpack_bits(p["salient"], p.spec.in_features).sum())
        if n_sal != p.spec.n_salient:
            raise ArbqError(f"{name}: salient bitmap marks {n_sal} columns, the config says {p.spec.n_salient}")


def pack_linear(res: LinearResult, scheme: Scheme, scale_dtype: str = "fp16") -> PackedLinear:
    """Pack one LinearResult with the slots `scheme` uses (see `check_representable` for the contract)."""
    n, k = res.shape
    sal = res.salient.bool() if scheme.salient else torch.zeros(k, dtype=torch.bool)
    s = int(sal.sum())
    spec = LinearSpec(n, k, s, res.blocksize, scheme, scale_dtype, res.order is not None)
    out = {"sign1": pack_bits(res.sign1.bool())}
    if res.order is not None:
        out[ORDER] = res.order.to(torch.int16)
    if scheme.group:
        g = res.group.bool() if scheme.cgb else res.group.bool() & ~sal
        out["group"] = pack_bits(g)
    if scheme.salient:
        out["salient"] = pack_bits(sal)
        out["sign2"] = pack_bits(res.sign2.bool()[:, sal])
    out.update(encode_values(res, scheme, sal, scale_dtype))
    return PackedLinear(spec, {name: t.contiguous() for name, t in out.items()})


def encode_values(res: LinearResult, scheme: Scheme, sal: torch.Tensor, scale_dtype: str) -> dict[str, torch.Tensor]:
    """The stored value tensors of `res` (sal: [K] bool, the stored salient columns): "values" [N, T, V] (the
    scheme's α then μ slots), and for RC "colscale_ns" [C0, K − S] and "colscale_sal" [C1, S] (+ fp8 factors)."""
    k, s = res.shape[1], int(sal.sum())
    vals = [res.alpha[:, :, kd, g, o] for kd, g, o in scheme.alpha_slots]
    vals += [res.mu[:, :, kd, g] for kd, g in scheme.mu_slots]
    out = encode_scales(torch.stack(vals, dim=-1), scale_dtype, "values")
    if scheme.rc:
        cs = res.col_scale.float()
        ns_cs = torch.stack([cs[g, o, ~sal] for g, o in scheme.cs_ns_slots]) if scheme.cs_ns_slots \
            else torch.zeros(0, k - s)
        sal_cs = torch.stack([cs[g, o, sal] for g, o in scheme.cs_sal_slots]) if scheme.cs_sal_slots \
            else torch.zeros(0, s)
        out.update(encode_scales(ns_cs, scale_dtype, "colscale_ns"))
        out.update(encode_scales(sal_cs, scale_dtype, "colscale_sal"))
    return out


def stored_values(res: LinearResult, scheme: Scheme, scale_dtype: str) -> dict[str, torch.Tensor]:
    """{"alpha", "mu", "col_scale"} fp32 as `pack_linear` stores them in scale_dtype (fp8: with its per-tensor
    factor) and `unpack_rows` reads them back; slots the scheme does not store keep res's values (no weight
    uses them). res.with_values(stored_values(...)).dequantize() is the packed Ŵ."""
    sal = res.salient.bool() if scheme.salient else torch.zeros(res.shape[1], dtype=torch.bool)
    enc = encode_values(res, scheme, sal, scale_dtype)
    vals = decode_scales(enc, "values")
    alpha, mu, cs = res.alpha.detach().clone().float(), res.mu.detach().clone().float(), \
        res.col_scale.detach().clone().float()
    for i, (kd, g, o) in enumerate(scheme.alpha_slots):
        alpha[:, :, kd, g, o] = vals[..., i]
    for i, (kd, g) in enumerate(scheme.mu_slots, start=len(scheme.alpha_slots)):
        mu[:, :, kd, g] = vals[..., i]
    if scheme.rc:
        ns_cs, sal_cs = decode_scales(enc, "colscale_ns"), decode_scales(enc, "colscale_sal")
        for i, (g, o) in enumerate(scheme.cs_ns_slots):
            cs[g, o, ~sal] = ns_cs[i]
        for i, (g, o) in enumerate(scheme.cs_sal_slots):
            cs[g, o, sal] = sal_cs[i]
    return {"alpha": alpha, "mu": mu, "col_scale": cs}


def unpack_rows(p: PackedLinear, r0: int = 0, r1: int | None = None) -> LinearResult:
    """Rows r0:r1 of the packed linear as a LinearResult (unused slots: mu 0, alpha 0, col scale 1)."""
    spec, sc = p.spec, p.spec.scheme
    n, k, s, t = spec.out_features, spec.in_features, spec.n_salient, spec.n_blocks
    r1 = n if r1 is None else r1
    rows = r1 - r0
    dev = p["sign1"].device
    sign1 = unpack_bits(p["sign1"][r0:r1], k)
    group = unpack_bits(p["group"][r0:r1], k) if sc.group else torch.zeros(rows, k, dtype=torch.bool, device=dev)
    sal = unpack_bits(p["salient"], k) if sc.salient else torch.zeros(k, dtype=torch.bool, device=dev)
    sign2 = torch.zeros(rows, k, dtype=torch.bool, device=dev)
    if sc.salient:
        sign2[:, sal] = unpack_bits(p["sign2"][r0:r1], s)
    vals = decode_scales(p.tensors, "values")[r0:r1]                  # [rows, T, V]
    alpha = torch.zeros(rows, t, 2, 2, 2, device=dev)
    mu = torch.zeros(rows, t, 2, 2, device=dev)
    for i, (kd, g, o) in enumerate(sc.alpha_slots):
        alpha[:, :, kd, g, o] = vals[..., i]
    for i, (kd, g) in enumerate(sc.mu_slots, start=len(sc.alpha_slots)):
        mu[:, :, kd, g] = vals[..., i]
    return LinearResult(sign1=sign1, sign2=sign2, group=group, salient=sal, alpha=alpha, mu=mu,
                        col_scale=full_col_scale(p), blocksize=spec.blocksize)


def full_col_scale(p: PackedLinear) -> torch.Tensor:
    """col_scale [2, 2, K] fp32: ones for non-RC methods, stored values (0 where unused) for RC."""
    spec, sc = p.spec, p.spec.scheme
    k, dev = spec.in_features, p.device
    if not sc.rc:
        return torch.ones(2, 2, k, device=dev)
    sal = unpack_bits(p["salient"], k) if sc.salient else torch.zeros(k, dtype=torch.bool, device=dev)
    cs = torch.zeros(2, 2, k, device=dev)
    ns_cs, sal_cs = decode_scales(p.tensors, "colscale_ns"), decode_scales(p.tensors, "colscale_sal")
    for i, (g, o) in enumerate(sc.cs_ns_slots):
        cs[g, o, ~sal] = ns_cs[i]
    for i, (g, o) in enumerate(sc.cs_sal_slots):
        cs[g, o, sal] = sal_cs[i]
    return cs


def dequantize_packed(p: PackedLinear, rows: int = 1024) -> torch.Tensor:
    """Ŵ [N, K] fp32 by LinearResult.dequantize's equation, `rows` rows at a time."""
    n = p.spec.out_features
    return torch.cat([unpack_rows(p, r, min(r + rows, n)).dequantize() for r in range(0, n, rows)]) \
        if n else torch.zeros(0, p.spec.in_features)


def check_representable(res: LinearResult, scheme: Scheme, name: str, rows: int = 1024) -> None:
    """Raise ArbqError if the slots `scheme` stores do not reproduce res.dequantize() exactly.

    This is the contract between a method and the format: e.g. an rc result with a nonzero mu, or a
    billm result without CGB whose salient columns use group 1, cannot be packed as that method.
    """
    packed = pack_linear(res, scheme, "fp32")
    n = res.shape[0]
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        sub = LinearResult(res.sign1[r0:r1], res.sign2[r0:r1], res.group[r0:r1], res.salient,
                           res.alpha[r0:r1], res.mu[r0:r1], res.col_scale, res.blocksize)
        want = sub.dequantize()
        got = unpack_rows(packed, r0, r1).dequantize()
        tol = 1e-6 * float(want.abs().max()) if want.numel() else 0.0
        err = float((got - want).abs().max()) if want.numel() else 0.0
        if not err <= tol:
            raise ArbqError(f"{name}: the binarization result uses slots that its method's packed format does "
                            f"not store (max error {err:.3g} after packing); method/cgb in run.json disagree "
                            "with the result")
