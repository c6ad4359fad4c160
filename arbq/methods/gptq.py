"""The block-wise loop with Hessian error compensation (GPTQ / BiLLM "BRAGPTQ", spec §1).

For W: [N, K] and H = (2/n) Σ xᵀx: [K, K]:
  1. dead inputs (H_jj = 0): H_jj ← 1, W[:, j] ← 0
  2. H ← H + λ·mean(diag H)·I; on Cholesky failure λ ← 10λ and retry
  3. U = upper Cholesky factor of H⁻¹
  4. per block [s, e): masks and fits from the compensated W[:, s:e]; Q = Ŵ;
     Err = block_errors(W[:, s:e] − Q, U[s:e, s:e]);  W[:, e:] −= Err · U[s:e, e:]
With run_order (binary methods): steps 3–4 run on W[:, π], H[π, π], π the runs of 8 columns by decreasing
Σ_{j ∈ run} H_jj (GPTQ's act order by whole runs), and the result keeps that order (LinearResult.order).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from arbq.errors import ArbqError
from arbq.methods.block import BlockFit, choose_masks, fit_block, regroups, round_scales
from arbq.methods.config import BinarizeConfig
from arbq.methods.polish import movable_columns, polish
from arbq.methods.result import LinearResult
from arbq.packed.order import RUN, order_columns

if TYPE_CHECKING:
    from arbq.methods.binary import BinaryMethod


def stored(res: LinearResult, params: dict, scale_dtype: str) -> LinearResult:
    """res with its values as the binary layout stores them: the identity for fp16 / bf16 / fp32 (the blocks
    were rounded already), fp8's per-tensor factor and e4m3 rounding applied once the linear is complete."""
    if scale_dtype != "fp8":
        return res
    from arbq.packed.layouts import layout_of

    return res.with_values(layout_of("binary").stored_values(res, params, scale_dtype))


def inverse_cholesky(H: torch.Tensor, percdamp: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """(U, λ used): U upper-triangular with UᵀU = (H + λ·mean(diag H)·I)⁻¹, λ escalating ×10 on failure."""
    K = H.shape[0]
    mean_diag = torch.diag(H).mean()
    lam = percdamp
    eye = torch.eye(K, dtype=H.dtype, device=H.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + lam * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, lam
        lam *= 10
    raise ArbqError(f"Hessian is not positive definite even with damping {lam / 10:g}")


def prepare_problem(W0: torch.Tensor, H: torch.Tensor | None, name: str, method: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, H) for a loop with Hessian compensation, from W0: [N, K] float32 and H: [K, K]: both checked
    (present, shapes, finite), H a float32 copy on W0's device, and step 1 of the module docstring applied to
    the copies (dead inputs: H_jj ← 1, W[:, j] ← 0)."""
    N, K = W0.shape
    if H is None:
        raise ArbqError(f"{name}: method {method} needs calibration statistics")
    H = H.float().to(W0.device).clone()
    if H.shape != (K, K):
        raise ArbqError(f"{name}: Hessian shape {tuple(H.shape)} does not match weight {N}x{K}")
    if not torch.isfinite(W0).all():
        raise ArbqError(f"{name}: weight contains NaN/Inf")
    if not torch.isfinite(H).all():
        raise ArbqError(f"{name}: Hessian contains NaN/Inf (bad calibration activations)")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W = W0.clone()
    W[:, dead] = 0
    return W, H


def _assemble(blocks: list[BlockFit], blocksize: int) -> LinearResult:
    cat = lambda name, dim: torch.cat([getattr(b, name) for b in blocks], dim)  # noqa: E731
    return LinearResult(
        sign1=cat("sign1", 1), sign2=cat("sign2", 1), group=cat("group", 1), salient=cat("salient", 0),
        alpha=torch.stack([b.alpha for b in blocks], 1), mu=torch.stack([b.mu for b in blocks], 1),
        col_scale=cat("col_scale", 2), blocksize=blocksize)


def error_row(W0: torch.Tensor, What: torch.Tensor, H: torch.Tensor | None, name: str, cfg: BinarizeConfig,
              lam: float) -> dict:
    """The report row of one linear: relative weight error ‖W − Ŵ‖²/‖W‖² and (with H) output error
    tr(ΔHΔᵀ)/tr(WHWᵀ), Δ = W − Ŵ (H with dead inputs set to 1 on the diagonal)."""
    delta = W0 - What
    N, K = W0.shape
    row = {"module": name, "method": cfg.method, "cgb": cfg.cgb, "rows": N, "cols": K,
           "weight_err": float((delta * delta).sum() / (W0 * W0).sum().clamp_min(1e-30)), "damp": lam}
    if H is not None:
        out_err = float(((delta @ H) * delta).sum() / ((W0 @ H) * W0).sum().clamp_min(1e-30))
        row["output_err"] = out_err if math.isfinite(out_err) else float("nan")
    return row


def block_errors(E: torch.Tensor, Ub: torch.Tensor, compensation: str) -> torch.Tensor:
    """The errors Err [N, C] a block pushes to the later columns (W[:, later] −= Err · U[block, later]) once
    all of its C columns are fixed at Q, from E = W_b − Q: [N, C] and the block's part U_b: [C, C] of U.

    "exact":    Err = E · U_b⁻¹ (a triangular solve). This is GPTQ's column recursion with Q fixed in advance,
                err_j = (w'_j − q_j) / U_jj with w' the block's weights after the updates of the columns before
                j, and it leaves the optimal later columns for the block's Q: the loss that remains is
                ‖E · U_b⁻¹‖² per row, the minimum over the later columns.
    "diagonal": Err = E / diag(U_b), the BiLLM / ARB-LLM reference code's (the updates inside the block are
                dropped, so the later columns are compensated as if U_b were diagonal).
    """
    if compensation == "diagonal":
        return E / torch.diag(Ub)[None, :]
    return torch.linalg.solve_triangular(Ub, E, upper=True, left=False)


def run_order(hdiag: torch.Tensor, m: int) -> torch.Tensor:
    """The full runs of m columns by decreasing Σ_{j ∈ run} H_jj (ties: left first), int64 [⌊K/m⌋]: the order in
    which the loop takes them with `run_order` / `nm_act_order` (GPTQ's act order by whole runs)."""
    runs = hdiag[: hdiag.numel() - hdiag.numel() % m].reshape(-1, m).sum(1)
    return torch.argsort(runs, descending=True, stable=True)


def in_run_order(W: torch.Tensor, H: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The problem the loop solves with act order by runs of m: (W[:, π], H[π, π], run order) with
    π = order_columns(run_order(diag H, m)). W: [N, K], H: [K, K]."""
    order = run_order(torch.diag(H), m)
    cols = order_columns(order, m, W.shape[1])
    return W[:, cols], H[cols][:, cols], order


def binarize_linear(W: torch.Tensor, H: torch.Tensor | None, cfg: BinarizeConfig, name: str = "linear",
                    strategy: BinaryMethod | None = None) -> tuple[LinearResult, dict]:
    """Binarize W: [N, K] with the binary strategy of `cfg.method` (or `strategy`); H: [K, K] (None only
    for Hessian-free methods).

    Returns the result and a report row: relative weight error ‖W − Ŵ‖²/‖W‖², relative output
    error tr(ΔHΔᵀ)/tr(WHWᵀ) with Δ = W − Ŵ (= ‖XWᵀ − XŴᵀ‖²/‖XWᵀ‖² on the calibration inputs),
    damping used, seconds.
    """
    t0 = time.perf_counter()
    if strategy is None:
        from arbq.methods.binary import STRATEGIES

        strategy = STRATEGIES[cfg.method]
    method = strategy
    W0 = W.detach().float()
    N, K = W0.shape
    B = cfg.blocksize
    U, lam, order = None, 0.0, None
    H_model = H                                          # the report's error is measured in the model's order
    if method.uses_hessian:
        W, H = prepare_problem(W0, H, name, cfg.method)
        H_model = H
        if cfg.run_order:
            W, H, order = in_run_order(W, H, RUN)
        U, lam = inverse_cholesky(H, cfg.percdamp)
    elif not torch.isfinite(W0).all():
        raise ArbqError(f"{name}: weight contains NaN/Inf")
    else:
        W = W0.clone()
    blocks = []
    for s in range(0, K, B):
        e = min(s + B, K)
        Wb = W[:, s:e]
        d = torch.diag(U)[s:e] if U is not None else None
        S = H[s:e, s:e] if H is not None else None
        salient, group = choose_masks(Wb, d, S, method, cfg)
        fit = round_scales(fit_block(Wb, salient, group, S, method, cfg), cfg.scale_dtype)
        if cfg.polish and U is not None:
            fit = polish(Wb, fit, U[s:e, s:e], cfg.polish, movable_columns(salient, regroups(method, cfg), cfg.cgb),
                         method.mean_form, cfg.scale_dtype)[0]
        blocks.append(fit)
        if U is not None:
            W[:, e:] -= block_errors(Wb - fit.w_hat, U[s:e, s:e], cfg.compensation) @ U[s:e, e:]
        W[:, s:e] = fit.w_hat
    res = replace(stored(_assemble(blocks, B), strategy.scheme_params(cfg), cfg.scale_dtype), order=order)
    What = res.dequantize()
    if not torch.isfinite(What).all():
        raise ArbqError(f"{name}: binarization produced NaN/Inf")
    row = error_row(W0, What, H_model, name, cfg, lam)
    row["salient_frac"] = float(res.salient.float().mean())
    row["seconds"] = round(time.perf_counter() - t0, 4)
    return res, row
