"""`--method gptq --bits B --group G`: asymmetric uniform B-bit quantization per group of G columns with
GPTQ's error compensation (Frantar et al. 2023) — the baseline a binarizer must beat at equal honest bits.

For W: [N, K], H = (2/n) Σ xᵀx: [K, K] and U the upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹
(arbq.methods.gptq.inverse_cholesky; dead inputs zeroed first), columns are processed in order, in
lazy batches of `blocksize`:

  at the first column of each group t: min-max parameters from the group's current (compensated) weights,
      lo = min(0, min w), hi = max(0, max w), s = (hi − lo)/(2^B − 1) rounded to the scale dtype,
      z = clamp(round(−lo/s), 0, 2^B − 1)
  per column j:  q_j = clamp(round(w_j/s) + z, 0, 2^B − 1),  ŵ_j = s·(q_j − z)
                 e = (w_j − ŵ_j)/U_jj,  W[:, j+1:] −= e·U[j, j+1:]

Results are arbq.packed.uniform.UniformResult (codes, scales, zero points), packed in the "uniform" layout.
"""

from __future__ import annotations

import time

import torch

from arbq.errors import ArbqError
from arbq.methods.block import SCALE_DTYPES
from arbq.methods.config import BinarizeConfig
from arbq.methods.gptq import error_row, inverse_cholesky
from arbq.methods.record import MethodRecord
from arbq.packed.uniform import BITS, UniformResult

Tensor = torch.Tensor


def group_params(w: Tensor, bits: int, scale_dtype: str) -> tuple[Tensor, Tensor]:
    """(scale [N], zero [N]) float32 for the group w: [N, c]; the scale is rounded to scale_dtype (what is
    stored), kept ≥ the dtype's smallest normal so that w/s stays finite."""
    maxq = (1 << bits) - 1
    lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
    flat = hi == lo
    lo, hi = torch.where(flat, -torch.ones_like(lo), lo), torch.where(flat, torch.ones_like(hi), hi)
    scale = (hi - lo) / maxq
    if scale_dtype != "fp32":
        dt = SCALE_DTYPES[scale_dtype]
        scale = scale.clamp_min(torch.finfo(dt).tiny).to(dt).float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes q = clamp(round(w/s) + z, 0, 2^bits − 1), float32 [N]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def gptq_uniform(W: Tensor, U: Tensor, bits: int, group: int, blocksize: int, scale_dtype: str) -> UniformResult:
    """The GPTQ loop of the module docstring on W: [N, K] (modified in place) with U: [K, K]."""
    N, K = W.shape
    G = -(-K // group)
    codes = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    scale, zero = torch.zeros(N, G, device=W.device), torch.zeros(N, G, device=W.device)
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1, device=W.device)
        Uin = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if j % group == 0:   # the group's current weights: this block's compensated part, then the rest
                g_end = min(j + group, K)
                cur = torch.cat([W1[:, i:min(g_end, i2) - i1], W[:, i2:g_end]], 1) if g_end > i2 else \
                    W1[:, i:g_end - i1]
                scale[:, j // group], zero[:, j // group] = group_params(cur, bits, scale_dtype)
            s, z = scale[:, j // group], zero[:, j // group]
            w = W1[:, i]
            q = quantize_column(w, s, z, bits)
            codes[:, j] = q.to(torch.uint8)
            err = (w - s * (q - z)) / Uin[i, i]
            W1[:, i:] -= err[:, None] * Uin[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return UniformResult(codes, scale, zero.to(torch.uint8), bits, group)


def fit(W: Tensor, H: Tensor | None, cfg: BinarizeConfig, name: str = "linear") -> tuple[UniformResult, dict]:
    """Quantize W: [N, K] with H: [K, K]; returns the result and the same report row as the binary methods."""
    t0 = time.perf_counter()
    if H is None:
        raise ArbqError(f"{name}: method gptq needs calibration statistics")
    W0 = W.detach().float()
    N, K = W0.shape
    H = H.float().to(W0.device).clone()
    if H.shape != (K, K):
        raise ArbqError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight {N}x{K}")
    if not (torch.isfinite(W0).all() and torch.isfinite(H).all()):
        raise ArbqError(f"{name}: weight or Hessian contains NaN/Inf")
    W = W0.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U, lam = inverse_cholesky(H, cfg.percdamp)
    res = gptq_uniform(W, U, cfg.bits, cfg.group, cfg.blocksize, cfg.scale_dtype)
    row = error_row(W0, res.dequantize(), H, name, cfg, lam)
    row.update(bits=cfg.bits, group=cfg.group, seconds=round(time.perf_counter() - t0, 4))
    return res, row


def _check(cfg: BinarizeConfig) -> None:
    if cfg.bits not in BITS:
        raise ArbqError(f"gptq: bits must be one of {', '.join(map(str, BITS))}, got {cfg.bits}")
    if cfg.group < 1:
        raise ArbqError(f"gptq: group must be >= 1, got {cfg.group}")


RECORD = MethodRecord(
    name="gptq", summary="GPTQ baseline: asymmetric uniform --bits per --group columns, error compensation",
    fit=fit, layout="uniform", layout_params=lambda cfg: {"bits": cfg.bits, "group": cfg.group},
    result_type=UniformResult, keys=("bits", "group", "blocksize", "percdamp", "scale_dtype"), check=_check)
