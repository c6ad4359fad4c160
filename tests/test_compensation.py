"""The errors a finished block pushes to the later columns (arbq.methods.gptq.block_errors): "exact" is GPTQ's
column recursion with the block's values fixed, leaves the optimal later columns, and lowers every binary
method's output error against the reference code's "diagonal" compensation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from arbq.methods.config import BinarizeConfig
from arbq.methods.gptq import block_errors, inverse_cholesky
from arbq.methods.registry import get_method

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from make_golden import synthetic_problem  # noqa: E402


def correlated_problem(n: int = 24, k: int = 96, tokens: int = 600, seed: int = 0):
    """W [n, k] and H = 2/m XᵀX of inputs with correlated columns (float64)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k ** 0.5 + torch.eye(k, dtype=torch.float64)
    X = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix
    return torch.randn(n, k, generator=g, dtype=torch.float64), 2.0 / tokens * X.T @ X


def column_recursion(Wb: torch.Tensor, Q: torch.Tensor, Ub: torch.Tensor) -> torch.Tensor:
    """GPTQ's inner loop, the slow way, with Q chosen before it: err_j = (w'_j − q_j)/U_jj, then the block's
    columns from j on are updated by −err_j·U[j, j:]."""
    W1, Err = Wb.clone(), torch.zeros_like(Wb)
    for j in range(Wb.shape[1]):
        err = (W1[:, j] - Q[:, j]) / Ub[j, j]
        W1[:, j:] -= err[:, None] * Ub[j, j:][None, :]
        Err[:, j] = err
    return Err


def test_exact_block_errors_are_the_column_recursion():
    W, H = correlated_problem()
    U, _ = inverse_cholesky(H, 0.01)
    Wb = W[:, 32:64]
    Q = torch.sign(Wb) * Wb.abs().mean(1, keepdim=True)
    Ub = U[32:64, 32:64]
    torch.testing.assert_close(block_errors(Wb - Q, Ub, "exact"), column_recursion(Wb, Q, Ub), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block_errors(Wb - Q, Ub, "diagonal"), (Wb - Q) / torch.diag(Ub))


def test_exact_compensation_leaves_the_optimal_later_columns():
    """With the first block fixed at Q, the loss tr(ΔHΔᵀ) after the update equals its minimum over the later
    columns, E (H_bb − H_bL H_LL⁻¹ H_Lb) Eᵀ (closed form); the diagonal update leaves more."""
    W, H = correlated_problem()
    U, lam = inverse_cholesky(H, 0.01)
    Hd = H + lam * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    b = 32
    Q = torch.sign(W[:, :b]) * W[:, :b].abs().mean(1, keepdim=True)
    E = W[:, :b] - Q

    def loss(compensation: str) -> float:
        Wn = W.clone()
        Wn[:, b:] -= block_errors(E, U[:b, :b], compensation) @ U[:b, b:]
        Wn[:, :b] = Q
        D = W - Wn
        return float(((D @ Hd) * D).sum())

    schur = Hd[:b, :b] - Hd[:b, b:] @ torch.linalg.solve(Hd[b:, b:], Hd[b:, :b])
    best = float(((E @ schur) * E).sum())
    assert loss("exact") == pytest.approx(best, rel=1e-9)
    assert loss("diagonal") > 1.2 * best


# measured on the golden layer (48 × 256, blocksize 64, correlated inputs): exact / diagonal output error
# billm 0.79, arb+cgb 0.79, x 0.72 (x+cgb), rc 0.78, rc+cgb 0.85, pbs2p 6:8 0.70, stbllm 6:8 0.84; each bound
# below is that ratio + 0.05, so the exact path getting ~6% worse fails
BOUNDS = {("billm", False): 0.84, ("arb", True): 0.84, ("x", True): 0.77, ("rc", False): 0.83, ("rc", True): 0.90,
          ("pbs2p", True): 0.75, ("stbllm", True): 0.89}


@pytest.mark.parametrize("method,cgb", list(BOUNDS), ids=[f"{m}{'+cgb' if c else ''}" for m, c in BOUNDS])
def test_exact_compensation_lowers_every_binary_methods_output_error(method, cgb):
    W, H = synthetic_problem()
    extra = {"regroup": 2, "nm_reprune": 1} if method == "pbs2p" else {"regroup": 2} if method == "stbllm" else {}
    err = {}
    for compensation in ("diagonal", "exact"):
        cfg = BinarizeConfig(method=method, cgb=cgb, blocksize=64, compensation=compensation, **extra).checked()
        err[compensation] = get_method(method).fit(W, H, cfg, "golden")[1]["output_err"]
    assert err["exact"] <= BOUNDS[method, cgb] * err["diagonal"]


def test_reference_recipes_compensate_the_reference_way():
    from arbq.methods.config import RECIPES_DIR, load_recipe

    for path in RECIPES_DIR.glob("*.yaml"):
        want = "diagonal" if path.stem.startswith("reference-") else "exact"
        assert load_recipe(path.stem).compensation == want, path.stem
