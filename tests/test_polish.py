"""`polish` (arbq.methods.polish): GPTQ's column recursion for a fitted block's codes and least squares for its
scales, against the block's exact loss ‖(W_b − Ŵ)·U_b⁻¹‖²; checked against obvious loops, pinned on the fixed
synthetic layer, and through binarize → pack → load."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
from packing_utils import fit_one_thread

import arbq
from arbq.methods.binary import STRATEGIES
from arbq.methods.block import choose_masks, fit_block, regroups, round_scales
from arbq.methods.config import BinarizeConfig
from arbq.methods.gptq import inverse_cholesky
from arbq.methods.nm import nm_mask
from arbq.methods.polish import RunPositions, exact_loss, movable_columns, polish, refit_scales, sequential_codes
from arbq.methods.result import LinearResult

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from make_golden import synthetic_problem  # noqa: E402

C = 64


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem()


def _block(problem, method: str, keep: bool = False, **keys):
    """The first 64-column block of the synthetic layer fitted as the loop fits it: (W_b, fit, U_b, cfg, keep)."""
    W, H = problem
    cfg = BinarizeConfig(method=method, blocksize=C, **keys).checked()
    strategy = STRATEGIES[method]
    U = inverse_cholesky(H, cfg.percdamp)[0][:C, :C]
    Wb = W[:, :C].clone()
    mask = nm_mask(Wb * Wb / torch.diag(U)[None, :] ** 2, 6, 8) if keep else None
    salient, group = choose_masks(Wb if mask is None else Wb * mask, torch.diag(U), H[:C, :C], strategy, cfg)
    fit = round_scales(fit_block(Wb, salient, group, H[:C, :C], strategy, cfg, mask), cfg.scale_dtype)
    if mask is not None:
        fit.w_hat = fit.w_hat * mask
    return Wb, fit, U, cfg, mask


def _dequantize(fit) -> torch.Tensor:
    return LinearResult(fit.sign1, fit.sign2, fit.group, fit.salient, fit.alpha[:, None], fit.mu[:, None],
                        fit.col_scale, blocksize=fit.w_hat.shape[1]).dequantize()


def _levels_by_hand(fit, i: int, j: int, g: int) -> list[float]:
    """Every value entry (i, j) may take in group g: μ ± α₁c₁ (± α₂c₂ in a salient column)."""
    k = int(fit.salient[j])
    mu = float(fit.mu[i, k, g])
    a1 = float(fit.alpha[i, k, g, 0] * fit.col_scale[g, 0, j])
    if not k:
        return [mu + s * a1 for s in (-1, 1)]
    a2 = float(fit.alpha[i, k, g, 1] * fit.col_scale[g, 1, j])
    return [mu + s * a1 + t * a2 for s, t in itertools.product((-1, 1), (-1, 1))]


def _recursion_by_hand(Wb, fit, U, movable, keep=None, m=None, weight=None, n=None):
    """GPTQ's recursion written out: entry by entry, the nearest of the enumerated levels of the allowed groups;
    with m, at each run's first column the n entries of highest (w² − (w − q)²)·c_j of the run stay."""
    W = Wb.clone().double()
    N, Cb = W.shape
    Q = torch.zeros_like(W)
    keep = None if keep is None else keep.clone()
    group = fit.group.clone()

    def nearest(i, j):
        groups = (0, 1) if movable[j] else (int(group[i, j]),)
        return min((abs(float(W[i, j]) - v), v, g) for g in groups for v in _levels_by_hand(fit, i, j, g))

    for j in range(Cb):
        if m is not None and j % m == 0:
            for i in range(N):
                gains = []
                for k in range(j, j + m):
                    _, v, _ = nearest(i, k)
                    w = float(W[i, k])
                    gains.append(((w * w - (w - v) ** 2) * float(weight[k]), k))
                kept = {k for _, k in sorted(gains, key=lambda t: (-t[0], t[1]))[:n]}
                for k in range(j, j + m):
                    keep[i, k] = k in kept
        for i in range(N):
            if keep is not None and not keep[i, j]:
                continue
            _, v, g = nearest(i, j)
            Q[i, j] = v
            group[i, j] = bool(g)
        err = (W[:, j] - Q[:, j]) / float(U[j, j])
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:].double()[None, :]
    return Q.float(), group, keep


@pytest.mark.parametrize("method,keys", [("rc", {"cgb": True, "regroup": 2}), ("x", {"cgb": False}),
                                         ("billm", {})])
def test_sequential_codes_are_gptqs_recursion_over_the_enumerated_levels(problem, method, keys):
    """Every code is the nearest of the enumerated levels of its allowed groups to the weight as the recursion has
    updated it; the stored signs and group bits dequantize to exactly those values."""
    Wb, fit, U, cfg, _ = _block(problem, method, **keys)
    movable = movable_columns(fit.salient, regroups(STRATEGIES[method], cfg), cfg.cgb)
    new, keep = sequential_codes(Wb, fit, U, movable)
    ref, group, _ = _recursion_by_hand(Wb, fit, U, movable)
    assert keep is None
    assert torch.allclose(new.w_hat, ref, atol=1e-6)
    assert torch.equal(new.group, group)
    assert torch.allclose(_dequantize(new), new.w_hat, atol=1e-7)
    assert exact_loss(Wb, new.w_hat, U) < exact_loss(Wb, fit.w_hat, U)


def test_pbs2p_positions_are_rechosen_run_by_run_inside_the_recursion(problem):
    """With RunPositions the recursion re-chooses each run's N:M positions on the updated weights (the n highest
    gains), and pruned entries are exact zeros."""
    Wb, fit, U, cfg, mask = _block(problem, "rc", keep=True, cgb=True, regroup=2)
    movable = movable_columns(fit.salient, True, cfg.cgb)
    weight = 1 / torch.diag(U) ** 2
    runs = RunPositions(8, weight, lambda gain: nm_mask(gain, 6, 8))
    new, keep = sequential_codes(Wb, fit, U, movable, mask, runs)
    ref, _, ref_keep = _recursion_by_hand(Wb, fit, U, movable, mask, 8, weight, 6)
    assert torch.equal(keep, ref_keep) and not torch.equal(keep, mask)
    assert (keep.reshape(keep.shape[0], -1, 8).sum(-1) == 6).all()
    assert torch.allclose(new.w_hat, ref, atol=1e-6) and (new.w_hat[~keep] == 0).all()


def _least_squares_by_hand(Wb, fit, U, mean_form: bool, keep=None) -> torch.Tensor:
    """Row by row: the design of the values each entry uses, mapped by U_b⁻¹, solved by torch.linalg.lstsq; the
    fitted Ŵ [N, C] (unique even where a row's values are not, e.g. a group of fewer members than values)."""
    Uinv = torch.linalg.inv(U.double())
    out = torch.zeros(Wb.shape, dtype=torch.float64)
    for i in range(Wb.shape[0]):
        cols, rows = {}, []
        for j in range(Wb.shape[1]):
            row = {}
            if keep is None or keep[i, j]:
                k, g = int(fit.salient[j]), int(fit.group[i, j])
                if mean_form:
                    row[("mu", k, g)] = 1.0
                row[("a", k, g, 1)] = (1.0 if fit.sign1[i, j] else -1.0) * float(fit.col_scale[g, 0, j])
                if k:
                    row[("a", k, g, 2)] = (1.0 if fit.sign2[i, j] else -1.0) * float(fit.col_scale[g, 1, j])
            for key in row:
                cols.setdefault(key, len(cols))
            rows.append(row)
        Phi = torch.zeros(len(rows), len(cols), dtype=torch.float64)
        for j, row in enumerate(rows):
            for key, v in row.items():
                Phi[j, cols[key]] = v
        sol = torch.linalg.lstsq(Uinv.T @ Phi, Uinv.T @ Wb[i].double()[:, None], driver="gelsd").solution
        out[i] = (Phi @ sol)[:, 0]
    return out


@pytest.mark.parametrize("method,keys,pruned", [("x", {"cgb": True}, False), ("rc", {"cgb": True}, False),
                                                ("rc", {"cgb": True}, True)])
def test_refit_scales_is_the_weighted_least_squares_of_every_row(problem, method, keys, pruned):
    """The refitted Ŵ equals the least squares of ‖(w_i − Φ_i θ) U_b⁻¹‖² solved row by row over the values the
    row's entries use; values no entry uses, and RC's means, stay as they were."""
    Wb, fit, U, cfg, mask = _block(problem, method, keep=pruned, **keys)
    mean_form = STRATEGIES[method].mean_form
    new = refit_scales(Wb, fit, U, mean_form, mask)
    ref = _least_squares_by_hand(Wb, fit, U, mean_form, mask)
    torch.testing.assert_close(new.w_hat.double(), ref, atol=2e-6, rtol=1e-4)
    assert torch.equal(new.alpha[:, 0, :, 1], fit.alpha[:, 0, :, 1])       # no non-salient entry has an order 2
    if not mean_form:
        assert torch.equal(new.mu, fit.mu)
    assert exact_loss(Wb, new.w_hat, U) < exact_loss(Wb, fit.w_hat, U)


@pytest.mark.parametrize("method", ["rc", "x", "billm", "arb"])
def test_polish_only_lowers_the_exact_loss(problem, method):
    """polish keeps a step only if the exact loss went down: more rounds never give a higher loss, 0 rounds change
    nothing, and the polished block is what its stored values dequantize to."""
    Wb, fit, U, cfg, _ = _block(problem, method, cgb=method != "billm")
    movable = movable_columns(fit.salient, regroups(STRATEGIES[method], cfg), cfg.cgb)
    mean_form = STRATEGIES[method].mean_form
    assert polish(Wb, fit, U, 0, movable, mean_form, "fp16")[0] is fit
    losses = [exact_loss(Wb, polish(Wb, fit, U, r, movable, mean_form, "fp16")[0].w_hat, U) for r in (0, 1, 2, 3)]
    assert losses == sorted(losses, reverse=True) and losses[1] < 0.9 * losses[0]
    final = polish(Wb, fit, U, 3, movable, mean_form, "fp16")[0]
    assert torch.allclose(_dequantize(final), final.w_hat, atol=1e-7)
    assert torch.equal(final.alpha, final.alpha.half().float()) and torch.equal(final.mu, final.mu.half().float())


def test_polish_pins_the_error_of_the_shipped_settings(problem):
    """The fixed synthetic layer (1 thread, blocksize 64), output error with polish 3 (rc+cgb with run_order,
    x+cgb, pbs2p and stbllm at 6:8), pinned within 3%; each below 0.87× of the same fit without it. pbs2p
    re-chooses its positions (its keep differs), stbllm keeps its one-shot mask."""
    rc = {"method": "rc", "cgb": True, "regroup": 2, "run_order": True}
    nm = {"cgb": True, "regroup": 2, "nm_act_order": True}
    pbs2p = {"method": "pbs2p", "nm": "6:8", "nm_reprune": 1, "nm_masks": "pruned", **nm}
    stbllm = {"method": "stbllm", "nm": "6:8", **nm}
    x = {"method": "x", "cgb": True}
    for name, keys in (("rc", rc), ("x", x), ("pbs2p", pbs2p), ("stbllm", stbllm)):
        plain, plain_row, _ = fit_one_thread(*problem, blocksize=64, **keys)
        res, row, _ = fit_one_thread(*problem, blocksize=64, polish=3, **keys)
        assert row["output_err"] == pytest.approx(POLISHED[name], rel=0.03), name
        assert row["output_err"] < 0.87 * plain_row["output_err"], name
        if "nm" in keys:                        # the N:M cases keep N of every run of 8
            assert (res.keep.reshape(res.keep.shape[0], -1, 8).sum(-1) == 6).all()
            assert torch.equal(res.keep, plain.keep) == (name == "stbllm"), name


# measured (1 thread): without polish 0.0264429 / 0.0352537 / 0.0183658 / 0.0316336
POLISHED = {"rc": 0.0193318, "x": 0.0240730, "pbs2p": 0.0147680, "stbllm": 0.0266703}


def test_polish_binarizes_packs_and_loads(tiny_llama_dir, botchan, tmp_path, arbq_cli, monkeypatch):
    """`--polish 2` through the CLI on a tiny model: rc+cgb and the pbs2p recipe pack and run from the bits with
    the fake-quant logits (arbq.load, torch backend); a negative value and a method without a Hessian are
    refused with one line."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ARBQ_KERNEL", "torch")
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    data = ["--data", botchan, "--nsamples", "4", "--seqlen", "32"]
    for name, args in (("rc", ["--method", "rc", "--cgb"]), ("pbs2p", ["--recipe", "pbs2p"])):
        run, packed = tmp_path / name, tmp_path / f"{name}-packed"
        r = arbq_cli("binarize", tiny_llama_dir, "-o", run, "--polish", "2", *args, *data)
        assert r.returncode == 0, r.stderr
        assert arbq_cli("pack", run, "-o", packed, "--dtype", "fp32").returncode == 0
        with torch.no_grad():
            want = AutoModelForCausalLM.from_pretrained(run / "model-fake")(ids).logits
            got = arbq.load(packed)(ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for args, msg in ((["--method", "sign", "--polish", "1"], "polish is read by"),
                      (["--method", "rc", "--polish", "-1"], "polish must be >= 0")):
        r = arbq_cli("binarize", tiny_llama_dir, "-o", tmp_path / "bad", *args, *data)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
