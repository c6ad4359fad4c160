"""`--method gptq --bits B --group G`: asymmetric uniform B-bit quantization per group of G columns with
GPTQ's error compensation (Frantar et al. 2023) — the baseline a binarizer must beat at equal honest bits.

For W: [N, K], H = (2/n) Σ xᵀx: [K, K] and U the upper Cholesky factor of (H + λ·mean(diag H)·I)⁻¹
(arbq.methods.gptq.inverse_cholesky; dead inputs zeroed first), columns are processed in lazy batches of
`blocksize`, in the order of decreasing H_jj with `act_order` (the default, as llm-compressor's "static"
activation ordering: groups stay runs of G consecutive columns, so nothing extra is stored), else left to right:

  min-max parameters of group t, lo = min(0, min w), hi = max(0, max w), s = (hi − lo)/(2^B − 1) rounded to
      the scale dtype, z = clamp(round(−lo/s), 0, 2^B − 1): with act_order from the original weights of the
      group, before any column is processed; without, at the group's first column from its current
      (error-compensated) weights, as the GPTQ reference code does
  per column j:  q_j = clamp(round(w_j/s) + z, 0, 2^B − 1),  ŵ_j = s·(q_j − z)
                 e = (w_j − ŵ_j)/U_jj,  W[:, later] −= e·U[j, later]   (U of H in processing order)

With `keep_columns` f > 0, the k = round(f·K) columns of largest sensitivity H_jj·‖W_:,j‖² (OWQ's weak columns)
are kept in fp16: they are processed last (absorbing every other column's compensation), stored as their
compensated values rounded to fp16, and left out of the min-max range of their groups, whose parameters are
then always fixed beforehand (as with act_order).

Results are arbq.packed.uniform.UniformResult (codes, scales, zero points, kept columns), packed in the
"uniform" layout.
"""

from __future__ import annotations

import time

import torch

from arbq.errors import ArbqError
from arbq.methods.block import SCALE_DTYPES
from arbq.methods.config import BinarizeConfig
from arbq.methods.gptq import error_row, inverse_cholesky, prepare_problem
from arbq.methods.record import MethodRecord
from arbq.packed.uniform import BITS, KEEP_DTYPE, UniformResult, n_keep

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


def static_params(W: Tensor, bits: int, group: int, scale_dtype: str, kept: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """(scale, zero) [N, G] of every group of W: [N, K] from its weights as they are, over the columns not
    `kept` ([K] bool; a group with every column kept uses all of them)."""
    def cols(t: int) -> Tensor:
        w = W[:, t:t + group]
        return w if kept is None or bool(kept[t:t + group].all()) else w[:, ~kept[t:t + group]]
    pairs = [group_params(cols(t), bits, scale_dtype) for t in range(0, W.shape[1], group)]
    return torch.stack([p[0] for p in pairs], 1), torch.stack([p[1] for p in pairs], 1)


def gptq_uniform(W: Tensor, U: Tensor, bits: int, group: int, blocksize: int, scale_dtype: str,
                 perm: Tensor | None = None, keep: int = 0) -> UniformResult:
    """The GPTQ loop of the module docstring on W: [N, K] (columns in processing order, modified in place)
    with U: [K, K] of H in that order. perm: processing position -> original column (act_order), whose
    groups' parameters are then fixed from W before the loop; None = left to right, parameters from the
    compensated weights at each group's first column. keep: the last `keep` processing positions are kept
    columns (needs perm). Codes, scales and zeros come back in original order."""
    N, K = W.shape
    dev = W.device
    codes = torch.zeros(N, K, dtype=torch.uint8, device=dev)
    kept_w = torch.zeros(N, keep, device=dev)
    if perm is not None:
        inv = torch.argsort(perm)
        kept = torch.zeros(K, dtype=torch.bool, device=dev)
        kept[perm[K - keep:]] = True
        scale, zero = static_params(W[:, inv], bits, group, scale_dtype, kept if keep else None)
        gidx = perm // group
    else:
        G = -(-K // group)
        scale, zero = torch.zeros(N, G, device=dev), torch.zeros(N, G, device=dev)
        gidx = torch.arange(K, device=dev) // group
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1, device=dev)
        Uin = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            t = int(gidx[j])
            if perm is None and j % group == 0:   # the group's current weights: this block's part, then the rest
                g_end = min(j + group, K)
                cur = torch.cat([W1[:, i:min(g_end, i2) - i1], W[:, i2:g_end]], 1) if g_end > i2 else \
                    W1[:, i:g_end - i1]
                scale[:, t], zero[:, t] = group_params(cur, bits, scale_dtype)
            w = W1[:, i]
            if j >= K - keep:                     # a kept column: its compensated value, rounded to fp16
                kept_w[:, j - (K - keep)] = w_hat = w.to(KEEP_DTYPE).float()
            else:
                s, z = scale[:, t], zero[:, t]
                q = quantize_column(w, s, z, bits)
                codes[:, j] = q.to(torch.uint8)
                w_hat = s * (q - z)
            err = (w - w_hat) / Uin[i, i]
            W1[:, i:] -= err[:, None] * Uin[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    if not keep:
        return UniformResult(codes, scale, zero.to(torch.uint8), bits, group)
    idx, order = torch.sort(perm[K - keep:])
    return UniformResult(codes, scale, zero.to(torch.uint8), bits, group, idx, kept_w[:, order])


def fit(W: Tensor, H: Tensor | None, cfg: BinarizeConfig, name: str = "linear") -> tuple[UniformResult, dict]:
    """Quantize W: [N, K] with H: [K, K]; returns the result and the same report row as the binary methods."""
    t0 = time.perf_counter()
    W0 = W.detach().float()
    K = W0.shape[1]
    W, H = prepare_problem(W0, H, name, "gptq")
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if cfg.act_order else None
    keep = n_keep(cfg.keep_columns, K)
    if keep:                                   # the most sensitive columns last, in decreasing sensitivity
        score = torch.diag(H) * (W ** 2).sum(0)
        last = torch.argsort(score, descending=True, stable=True)[:keep]
        is_last = torch.zeros(K, dtype=torch.bool, device=W.device)
        is_last[last] = True
        base = perm if perm is not None else torch.arange(K, device=W.device)
        perm = torch.cat([base[~is_last[base]], last])
    Hp = H[perm][:, perm] if perm is not None else H
    U, lam = inverse_cholesky(Hp, cfg.percdamp)
    res = gptq_uniform(W[:, perm] if perm is not None else W, U, cfg.bits, cfg.group, cfg.blocksize,
                       cfg.scale_dtype, perm, keep)
    row = error_row(W0, res.dequantize(), H, name, cfg, lam)
    row.update(bits=cfg.bits, group=cfg.group, kept_columns=keep, seconds=round(time.perf_counter() - t0, 4))
    return res, row


def _check(cfg: BinarizeConfig) -> None:
    if cfg.bits not in BITS:
        raise ArbqError(f"gptq: bits must be one of {', '.join(map(str, BITS))}, got {cfg.bits}")
    if cfg.group < 1:
        raise ArbqError(f"gptq: group must be >= 1, got {cfg.group}")
    if cfg.scale_dtype == "fp8":
        raise ArbqError("gptq: scale_dtype fp8 is not a fit setting for gptq; fit with fp16 and pack with "
                        "--scale-dtype fp8")
    if not 0 <= cfg.keep_columns < 0.5:
        raise ArbqError(f"gptq: keep_columns must be in [0, 0.5), got {cfg.keep_columns}")


RECORD = MethodRecord(
    name="gptq", summary="GPTQ baseline: asymmetric uniform --bits per --group columns, error compensation",
    fit=fit, layout="uniform",
    layout_params=lambda cfg: {"bits": cfg.bits, "group": cfg.group, "keep": cfg.keep_columns},
    result_type=UniformResult,
    keys=("bits", "group", "act_order", "keep_columns", "blocksize", "percdamp", "scale_dtype"),
    check=_check,
    label=lambda cfg: f"gptq-{cfg.bits}b-g{cfg.group}" + (f"-keep{cfg.keep_columns:g}" if cfg.keep_columns else ""))
