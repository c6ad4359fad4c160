"""N:M semi-structured pruning with binarization: `--method pbs2p` (stepwise, inside the block loop) and
`--method stbllm` (one-shot pruning first, then binarization) — spec: ../shared/spec/pbs2p.md.

Both keep, in every row and every run of M consecutive input columns, N weights (`nm: "N:M"`), binarize the
kept ones with the ARB-RC structure (salient columns, magnitude split, CGB as the recipe says; `nm_base`
picks another binary strategy) and store them in the "binary_nm" layout (arbq.packed.nm).

pbs2p (SPBO, stepwise pruning with binarization optimization), per column block of the GPTQ loop on the
error-compensated weights W_b with d = diag(U)_b (U: upper Cholesky factor of H⁻¹):
  0. masks (salient columns, group bits) and the dense fit Ŵ⁰ of the block (nm_masks "pruned": the masks are
     chosen on the block with its one-shot N:M mask by w_ij² · c_j zeroed, as stbllm chooses them on its
     pruned weights; the steps below still prune by Δ)
  t = 1 … M − N: in each row and run of M columns, prune the kept entry whose removal costs least given the
     current binarization,  Δ_ij = (w_ij² − (w_ij − ŵ_ij)²) · c_j,  c_j = 1/d_j² ("hessian", OBS's weight of
     column j) or H_jj ∝ ‖X_j‖² ("wanda"); then re-fit every group on the survivors (ARB iterations)
     (nm_substeps k: each step in k sub-steps; sub-step i prunes in the runs of lowest min Δ of every row until
      i/k of its runs have lost their t-th weight, re-fitting in between)
  nm_reprune R: R Lloyd rounds over the positions after the last step (`best_positions`: in every run of M
     keep the N weights whose zero costs most against their nearest binary level, re-fit; a round is kept
     only if the block's weighted error Σ c_j (w_ij − ŵ_ij)² went down) — a pruned weight can come back
  compensation: Err = gptq.block_errors(W_b − Ŵ) with Ŵ = 0 at pruned entries, W[:, later] −= Err·U[b, later]
  (nm_compensate: after each step, `compensate_pruned` moves the block's later survivors by the OBS updates of
   what that step pruned, and the errors it applied inside the block are added to Err for the later blocks:
   with W_b' = W_b − E·U_b the updated block, (W_b − Ŵ)·U_b⁻¹ = (W_b' − Ŵ)·U_b⁻¹ + E, so the sum is exact)
  (nm_stepwise false: all M − N entries of a run pruned at once by Δ⁰ — the one-shot ablation)
  polish R (both methods, arbq.methods.polish): the block's codes by GPTQ's column recursion and its row scales by
  least squares against the exact loss; pbs2p also re-chooses the N:M positions of each run of M when the
  recursion reaches it, stbllm keeps its one-shot mask

nm_act_order (both methods): the loop above runs on W[:, π], H[π, π] with π the columns of the runs of M taken in
decreasing Σ_{j ∈ run} H_jj (a last partial run stays last), so what is pruned or binarized early is compensated by
the less used runs after it (GPTQ's act order; whole runs move, so every run of the fit is N:M); the result keeps
Ŵ in that order with the run order (NMResult.order) and dequantizes to the model's order.

stbllm (the prune-then-binarize baseline): the N:M mask of the whole W from the same metric on the
original weights (w_ij² · c_j), pruned weights set to 0 before the loop (so their loss is not compensated,
as when a pruned checkpoint is binarized), then the binarizer on the survivors inside the same GPTQ loop.
"""

from __future__ import annotations

import time
from dataclasses import fields, replace

import torch

from arbq.errors import ArbqError
from arbq.methods import cfs
from arbq.methods.binary import BINARY_KEYS, STRATEGIES, BinaryMethod
from arbq.methods.block import BlockFit, choose_masks, fit_block, nearest_group, regroups, round_scales
from arbq.methods.config import BinarizeConfig
from arbq.methods.gptq import (
    _assemble,
    block_errors,
    error_row,
    in_run_order,
    inverse_cholesky,
    prepare_problem,
    stored,
)
from arbq.methods.polish import RunPositions, movable_columns, polish
from arbq.methods.record import MethodRecord
from arbq.packed.nm import NMResult

Tensor = torch.Tensor


def parse_nm(nm: str) -> tuple[int, int]:
    """"N:M" -> (N, M) with 1 ≤ N < M ≤ 16."""
    try:
        n, m = (int(v) for v in str(nm).split(":"))
    except ValueError:
        raise ArbqError(f"recipe: nm must look like N:M (e.g. 6:8), got {nm!r}") from None
    if not 1 <= n < m <= 16:
        raise ArbqError(f"recipe: nm {nm!r} needs 1 <= N < M <= 16")
    return n, m


def prune_lowest(score: Tensor, keep: Tensor, m: int, per_run: int) -> Tensor:
    """keep [N, C] with, in every full run of m columns of every row, the `per_run` kept entries of lowest
    score removed (a last partial run is left as it is: `_trim_tail`). score, keep: [N, C] → [N, C]."""
    N, C = score.shape
    out = keep.clone()
    full = C - C % m
    if full:
        s = score[:, :full].reshape(N, -1, m).masked_fill(~keep[:, :full].reshape(N, -1, m), float("inf"))
        idx = torch.argsort(s, dim=-1, stable=True)[..., :per_run]
        out[:, :full] = out[:, :full].reshape(N, -1, m).scatter(-1, idx, False).reshape(N, full)
    return out


def prune_cheapest_runs(score: Tensor, keep: Tensor, m: int, kept_after: int, quota: int) -> Tensor:
    """One sub-step of a pruning step: in every row, the full runs of m columns that still keep more than
    `kept_after` entries are pending; the pending runs whose lowest kept score is smallest each lose that entry,
    until `quota` of the row's runs keep `kept_after` (quota = all runs: every pending run loses one, which is
    prune_lowest(score, keep, m, 1) when every run keeps kept_after + 1). score, keep: [N, C] → [N, C]."""
    N, C = score.shape
    full = C - C % m
    if not full:
        return keep.clone()
    k = keep[:, :full].reshape(N, -1, m)
    s = score[:, :full].reshape(N, -1, m).masked_fill(~k, float("inf"))
    order = torch.argsort(s, dim=-1, stable=True)[..., :1]                      # [N, R, 1] each run's cheapest
    pending = k.sum(-1) > kept_after
    run_min = s.gather(-1, order)[..., 0].masked_fill(~pending, float("inf"))
    rank = torch.argsort(torch.argsort(run_min, dim=-1, stable=True), dim=-1)
    now = (quota - (~pending).sum(-1, keepdim=True)).clamp_min(0)
    chosen = pending & (rank < now)
    pruned = torch.zeros_like(k).scatter(-1, order, chosen[..., None])
    out = keep.clone()
    out[:, :full] = (k & ~pruned).reshape(N, full)
    return out


def _trim_tail(score: Tensor, keep: Tensor, n: int, m: int) -> Tensor:
    """The last partial run (r = C mod m columns) keeps min(n, r) entries: drop the lowest-scoring extras."""
    r = keep.shape[1] % m
    extra = r - min(n, r)
    if not r or not extra:
        return keep
    tail = prune_lowest(score[:, -r:], keep[:, -r:], r, extra)
    return torch.cat([keep[:, :-r], tail], 1)


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """One-shot N:M mask [N, C] keeping the n highest scores of every run of m columns (min(n, r) of a
    last partial run of r columns)."""
    keep = torch.ones_like(score, dtype=torch.bool)
    return _trim_tail(score, prune_lowest(score, keep, m, m - n), n, m)


def compensate_pruned(Wb: Tensor, keep: Tensor, Ub: Tensor) -> tuple[Tensor, Tensor]:
    """OBS/GPTQ updates for the pruned entries of one block, column by column (U_b: the block's part of the
    upper Cholesky factor of H⁻¹): for j = 0 … C − 1,
        e_j = W[:, j] ∘ (1 − keep[:, j]) / U_jj,   W[:, j+1:] −= e_j U[j, j+1:]
    Wb, keep: [N, C]; U_b: [C, C] → (W' [N, C] with pruned entries 0 and the survivors updated, E [N, C]: the
    errors still owed to the later blocks, W[:, later] −= E · U[block, later]). Entries pruned earlier are 0
    and only carry the updates they receive from columns before them."""
    W = Wb.clone()
    E = torch.zeros_like(W)
    drop = (~keep).to(W.dtype)
    for j in range(W.shape[1]):
        e = W[:, j] * drop[:, j] / Ub[j, j]
        W[:, j + 1:] -= e[:, None] * Ub[j, j + 1:][None, :]
        E[:, j] = e
    return W * keep, E


def best_positions(Wb: Tensor, fit: BlockFit, c: Tensor, n: int, m: int, cgb: bool) -> tuple[Tensor, Tensor]:
    """The N:M positions and group bits that minimise the block's weighted error Σ c_j (w_ij − ŵ_ij)² for the
    fit's current levels: with ŵ_g the best binary level of each weight in group g (block.nearest_group),
        gain_ij = (w_ij² − min_g (w_ij − ŵ_g,ij)²) · c_j,   keep = the N highest gains of every run of M,
    each kept weight in its nearer group (salient columns keep theirs unless cgb, and are scored in it; pruned
    entries keep theirs).
    Wb: [N, C], c: [1, C] → (keep [N, C], group [N, C])."""
    cost, nearer = nearest_group(Wb, fit, cgb)
    keep = nm_mask((Wb * Wb - torch.where(nearer, cost[1], cost[0])) * c, n, m)
    return keep, torch.where(keep, nearer, fit.group)


def reprune(Wb: Tensor, fit: BlockFit, keep: Tensor, c: Tensor, n: int, m: int, S: Tensor | None,
            method: BinaryMethod, cfg: BinarizeConfig) -> tuple[BlockFit, Tensor]:
    """cfg.nm_reprune Lloyd rounds over the positions: `best_positions` for the current levels, then the groups
    re-fitted on them; a round is taken only if the block's weighted error Σ c_j (w_ij − ŵ_ij)² went down (ŵ is
    0 at pruned entries). Wb, keep: [N, C]; c: [1, C] → (fit, keep)."""
    def err(f: BlockFit) -> float:
        return float((((Wb - f.w_hat) ** 2) * c).sum())

    best = err(fit)
    for _ in range(cfg.nm_reprune):
        new_keep, group = best_positions(Wb, fit, c, n, m, cfg.cgb)
        if torch.equal(new_keep, keep):
            break
        new = fit_block(Wb, fit.salient, group, S, method, cfg, new_keep)
        e = err(new)
        if e >= best:
            break
        fit, keep, best = new, new_keep, e
    return fit, keep


# the fits between pruning steps only rank the next step's entries; with nm_reprune (which re-chooses the
# positions against the full fit afterwards) they use the threshold split and 5 ARB iterations. Measured:
# synthetic 1536×576 / 576×1536 layers, output error within 2% of full step fits at 1.5× less time; fixture
# model at 6:8, held-out 60.93 vs 57.52 with full step fits, binarize 1.67× vs 2.75× rc-cgb's time (the
# issue's budget is 2×)
STEP_FIT = {"regroup": 0, "iters": 5}


def _schedule(steps: int, substeps: int, runs: int) -> list[tuple[int, int]]:
    """(step t, quota) of every sub-step: sub-step i of step t brings round(R·i/substeps) of a row's R full runs
    to m − 1 − t kept. With substeps > 1, sub-steps that would prune nothing are dropped, but never the last
    (it also trims a partial last run)."""
    plan = [(t, round(runs * i / substeps)) for t in range(steps) for i in range(1, substeps + 1)]
    if substeps == 1:
        return plan
    out = [p for j, p in enumerate(plan[:-1]) if p[1] > 0 and (j == 0 or plan[j - 1] != p) and p != plan[-1]]
    return out + plan[-1:]


def column_weight(metric: str, d: Tensor, hdiag: Tensor) -> Tensor:
    """c_j of the module docstring: 1/d_j² (hessian) or H_jj (wanda)."""
    return 1.0 / (d * d) if metric == "hessian" else hdiag


def _strategy(cfg: BinarizeConfig) -> BinaryMethod:
    return STRATEGIES[cfg.nm_base]


def nm_binarize(W0: Tensor, H: Tensor | None, cfg: BinarizeConfig, name: str, stepwise: bool | None,
                ) -> tuple[NMResult, dict]:
    """The loop of the module docstring. stepwise None = stbllm (mask first), else pbs2p (adaptive steps
    when True, one shot per block when False). W0: [N, K], H: [K, K] → (NMResult, report row)."""
    t0 = time.perf_counter()
    W0 = W0.detach().float()
    n, m = parse_nm(cfg.nm)
    method = _strategy(cfg)
    W, H = prepare_problem(W0, H, name, cfg.method)
    H_model = H                                          # the report's error is measured in the model's order
    order = None
    if cfg.nm_act_order:
        W, H, order = in_run_order(W, H, m)
    U, lam = inverse_cholesky(H, cfg.percdamp)
    N, K = W.shape
    d_all, hdiag = torch.diag(U), torch.diag(H)
    fixed = None
    if stepwise is None:                                   # stbllm: prune the original weights first
        fixed = nm_mask(W * W * column_weight(cfg.nm_metric, d_all, hdiag)[None, :], n, m)
        W = W * fixed
    B = cfg.blocksize
    step_cfg = replace(cfg, **STEP_FIT) if cfg.nm_reprune else cfg
    blocks, keeps = [], []
    for s in range(0, K, B):
        e = min(s + B, K)
        Wb, d, S = W[:, s:e], d_all[s:e], H[s:e, s:e]
        c = column_weight(cfg.nm_metric, d, hdiag[s:e])[None, :]
        on_pruned = fixed is None and cfg.nm_masks == "pruned"
        salient, group = choose_masks(Wb * nm_mask(Wb * Wb * c, n, m) if on_pruned else Wb, d, S, method, cfg)
        owed = torch.zeros_like(Wb)                      # pruning errors compensated inside the block
        if fixed is not None:
            keep = fixed[:, s:e]
        else:
            keep = torch.ones_like(Wb, dtype=torch.bool)
            plan = _schedule(m - n if stepwise else 1, cfg.nm_substeps if stepwise else 1, (e - s) // m)
            for j, (step, quota) in enumerate(plan):
                w_hat = fit_block(Wb, salient, group, S, method, step_cfg, keep).w_hat
                delta = (Wb * Wb - (Wb - w_hat) ** 2) * c
                keep = prune_cheapest_runs(delta, keep, m, m - 1 - step, quota) if stepwise else \
                    prune_lowest(delta, keep, m, m - n)
                if j == len(plan) - 1:
                    keep = _trim_tail(Wb * Wb * c, keep, n, m)
                if cfg.nm_compensate:
                    Wb, E = compensate_pruned(Wb, keep, U[s:e, s:e])
                    owed += E
        fit = fit_block(Wb, salient, group, S, method, cfg, keep)
        if fixed is None and cfg.nm_reprune:
            fit, keep = reprune(Wb, fit, keep, c, n, m, S, method, cfg)
        fit = round_scales(fit, cfg.scale_dtype)
        fit.w_hat = fit.w_hat * keep
        if cfg.polish:
            runs = None if fixed is not None else RunPositions(m, c[0], lambda gain: nm_mask(gain, n, m))
            fit, keep = polish(Wb, fit, U[s:e, s:e], cfg.polish, movable_columns(fit.salient, regroups(method, cfg),
                               cfg.cgb), method.mean_form, cfg.scale_dtype, keep, runs)
        blocks.append(fit)
        keeps.append(keep)
        err = block_errors(Wb - fit.w_hat, U[s:e, s:e], cfg.compensation) + owed
        W[:, e:] -= err @ U[s:e, e:]
        W[:, s:e] = fit.w_hat
    res = NMResult(stored(_assemble(blocks, B), _layout_params(cfg), cfg.scale_dtype), torch.cat(keeps, 1), n, m,
                   order)
    What = res.dequantize()
    if not torch.isfinite(What).all():
        raise ArbqError(f"{name}: binarization produced NaN/Inf")
    row = error_row(W0, What, H_model, name, cfg, lam)
    row.update(nm=cfg.nm, kept_frac=float(res.keep.float().mean()), salient_frac=float(res.base.salient.float().mean()),
               seconds=round(time.perf_counter() - t0, 4))
    return res, row


def _layout_params(cfg: BinarizeConfig) -> dict:
    n, m = parse_nm(cfg.nm)
    return _strategy(cfg).scheme_params(cfg) | {"n": n, "m": m}


def _check(cfg: BinarizeConfig) -> None:
    n, m = parse_nm(cfg.nm)
    cfs.allocate_n([], n, m, cfg.nm_cfs)          # the spread's range
    if cfg.blocksize % m:
        raise ArbqError(f"recipe: blocksize {cfg.blocksize} must be a multiple of M = {m} (runs of M columns "
                        "must not cross a block)")


NM_KEYS = (*BINARY_KEYS, "polish", "nm", "nm_metric", "nm_base", "nm_stepwise", "nm_compensate", "nm_reprune",
           "nm_substeps", "nm_masks", "nm_act_order")
# the keys only pbs2p reads (its pruning steps, and where its masks are chosen), with their "off" values
# (BinarizeConfig's defaults)
STEPWISE_KEYS = {f.name: f.default for f in fields(BinarizeConfig)
                 if f.name in ("nm_compensate", "nm_reprune", "nm_substeps", "nm_masks")}


def _record(name: str, summary: str, in_loop: bool) -> MethodRecord:
    def fit(W: Tensor, H: Tensor | None, cfg: BinarizeConfig, mod: str):
        return nm_binarize(W, H, cfg, mod, cfg.nm_stepwise if in_loop else None)

    def label(cfg: BinarizeConfig) -> str:
        return f"{name}-{cfg.nm}" + ("+cgb" if _layout_params(cfg)["cgb"] else "")

    def plan(cfg: BinarizeConfig, influence) -> list[dict] | None:
        return cfs.layer_plan(cfg.nm, cfg.nm_cfs, parse_nm, influence)

    def check(cfg: BinarizeConfig) -> None:
        _check(cfg)
        stepwise_only = [k for k in STEPWISE_KEYS if getattr(cfg, k) != STEPWISE_KEYS[k]]
        if not in_loop and stepwise_only:
            verb = "acts" if len(stepwise_only) == 1 else "act"
            raise ArbqError(f"recipe: {', '.join(stepwise_only)} {verb} on pbs2p's stepwise pruning; {name} prunes "
                            "once before binarizing and does not read them")

    return MethodRecord(name=name, summary=summary, fit=fit, layout="binary_nm", layout_params=_layout_params,
                        result_type=NMResult, keys=NM_KEYS, check=check, label=label, layer_plan=plan,
                        plan_keys=("nm_cfs",))


RECORDS = [
    _record("pbs2p", "PBS²P: N:M pruning introduced stepwise inside the block loop, ARB-RC re-fitted on survivors",
            True),
    _record("stbllm", "STBLLM-style baseline: one-shot N:M pruning of W first, then ARB-RC on the survivors", False),
]
