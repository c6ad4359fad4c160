"""The unpacked result of binarizing one linear layer, and how to dequantize it.

Every method (sign, billm, arb, x, rc, with or without CGB) produces the same structure, so that
`pack`, the fake-quant model and the reports need no per-method code.

A weight W[i, j] (i < N rows = out_features, j < K columns = in_features) lies in column block
t = j // B (B = blocksize). Column j has a *kind* k_j = salient[j] (1 = salient, 0 = not) and the
weight a *group bit* g_ij = group[i, j]. With s¹, s² = 2·sign1 − 1, 2·sign2 − 1 ∈ {−1, +1}:

    Ŵ[i, j] = mu[i, t, k, g] + alpha[i, t, k, g, 0] · col_scale[g, 0, j] · s¹[i, j]
                             + k_j · alpha[i, t, k, g, 1] · col_scale[g, 1, j] · s²[i, j]

Non-RC methods have col_scale ≡ 1; RC methods have mu ≡ 0. Second signs exist only in salient
columns (order-2 residual binarization); elsewhere sign2 is False and unused.

With a run order (recipe key run_order, arbq.packed.order) every tensor above holds the columns in the order the
block loop took them, runs of 8: j above is a stored column, and Ŵ_model[:, π] = Ŵ_stored with
π = order_columns(order, 8, K).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from arbq.errors import ArbqError
from arbq.packed.order import ORDER, RUN, check_order, in_model_order, order_columns

_NOT_PLANES = ("blocksize", "order")   # fields that to_tensors writes in their own form


@dataclass
class LinearResult:
    """Binarization of one linear W: [N, K] with column blocks of `blocksize`.

    sign1:     [N, K] bool   first sign bit (True = +1)
    sign2:     [N, K] bool   second sign bit, meaningful in salient columns only
    group:     [N, K] bool   group bit inside the weight's column kind
    salient:   [K]    bool   salient-column bitmap
    alpha:     [N, T, 2, 2, 2] float32  per row, block, kind, group, order
    mu:        [N, T, 2, 2]    float32  per row, block, kind, group
    col_scale: [2, 2, K]       float32  per group, order, column (RC); ones otherwise
    order:     None, or int64 [⌊K/8⌋]: the run order (the tensors above hold the columns order_columns(order))
    """

    sign1: torch.Tensor
    sign2: torch.Tensor
    group: torch.Tensor
    salient: torch.Tensor
    alpha: torch.Tensor
    mu: torch.Tensor
    col_scale: torch.Tensor
    blocksize: int
    order: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.sign1.shape)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{f.name}": getattr(self, f.name) for f in fields(self) if f.name not in _NOT_PLANES}
        out[f"{prefix}.blocksize"] = torch.tensor([self.blocksize], dtype=torch.int64)
        if self.order is not None:
            out[f"{prefix}.{ORDER}"] = self.order
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> LinearResult:
        try:
            kw = {f.name: tensors[f"{prefix}.{f.name}"] for f in fields(cls) if f.name not in _NOT_PLANES}
            kw["blocksize"] = int(tensors[f"{prefix}.blocksize"].item())
            kw["order"] = tensors.get(f"{prefix}.{ORDER}")
        except KeyError as e:
            raise ArbqError(f"binarization result for {prefix} is missing tensor {e}") from None
        res = cls(**kw)
        res.validate(prefix)
        return res

    def to(self, device: str | torch.device) -> LinearResult:
        return LinearResult(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                               for f in fields(self)})

    def tunable(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The stored values a block-wise reconstruction may move (arbq.methods.reconstruct), each as
        (value v₀, step scale σ) with v = v₀ + p·σ for the tuned p: α and the column scales multiplicatively
        (σ = |v₀|, so an unused slot stays 0), μ in units of its group's first scale (σ = |α[..., 0]|).
        μ ≡ 0 (RC: not stored) and column scales ≡ 1 (mean form: not stored) are left out."""
        out = {"alpha": (self.alpha, self.alpha.abs())}
        if bool((self.mu != 0).any()):
            out["mu"] = (self.mu, self.alpha[..., 0].abs())
        if bool((self.col_scale != 1).any()):
            out["col_scale"] = (self.col_scale, self.col_scale.abs())
        return out

    def with_values(self, values: dict[str, torch.Tensor]) -> LinearResult:
        """A copy with the named value tensors (keys of `tunable`) replaced; the bits are shared."""
        return replace(self, **values)

    def validate(self, name: str = "linear") -> None:
        """Raise ArbqError if the tensors' shapes disagree with each other."""
        n, k = self.sign1.shape
        t = -(-k // self.blocksize)
        want = {"sign2": (n, k), "group": (n, k), "salient": (k,), "alpha": (n, t, 2, 2, 2),
                "mu": (n, t, 2, 2), "col_scale": (2, 2, k)}
        for key, shape in want.items():
            got = tuple(getattr(self, key).shape)
            if got != shape:
                raise ArbqError(f"{name}: {key} has shape {got}, expected {shape} for a {n}x{k} weight")
        if self.order is not None:
            check_order(self.order, k, RUN, name)

    def dequantize(self) -> torch.Tensor:
        """Ŵ: [N, K] float32 from the equation in the module docstring, in the model's column order."""
        n, k = self.sign1.shape
        blk = torch.arange(k, device=self.sign1.device) // self.blocksize   # [K]
        kind = self.salient.long()                                      # [K]
        g = self.group.long()                                           # [N, K]
        base = (blk * 2 + kind) * 2                                     # [K]
        vg = base.unsqueeze(0) + g                                      # [N, K] index of (t, k, g)
        mu = torch.gather(self.mu.reshape(n, -1).float(), 1, vg)
        a = self.alpha.reshape(n, -1).float()
        a1 = torch.gather(a, 1, vg * 2)
        a2 = torch.gather(a, 1, vg * 2 + 1)
        cs = self.col_scale.float()
        c1 = torch.where(g.bool(), cs[1, 0], cs[0, 0])
        c2 = torch.where(g.bool(), cs[1, 1], cs[0, 1])
        s1 = self.sign1.float() * 2 - 1
        s2 = self.sign2.float() * 2 - 1
        w = mu + a1 * c1 * s1 + kind.float() * a2 * c2 * s2
        return in_model_order(w, None if self.order is None else order_columns(self.order, RUN, k))
