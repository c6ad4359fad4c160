"""The block-wise Hessian loop: damping, dead inputs, error metrics, bad input."""

import pytest
import torch

from arbq.errors import ArbqError
from arbq.methods.config import BinarizeConfig
from arbq.methods.gptq import binarize_linear, inverse_cholesky


def problem(n=48, k=80, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.distributions.StudentT(3.0).sample((n, k)) * 0.05
    X = torch.randn(tokens, k, generator=g) * torch.linspace(0.2, 2.0, k)
    return W, X, 2.0 / tokens * X.T @ X


def test_inverse_cholesky_factor():
    _, _, H = problem()
    U, lam = inverse_cholesky(H, 0.01)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0])
    torch.testing.assert_close(U.T @ U, torch.linalg.inv(Hd), rtol=1e-3, atol=1e-4)
    assert lam == 0.01 and torch.equal(U, torch.triu(U))


def test_damping_escalates_on_indefinite_hessian():
    H = torch.diag(torch.tensor([1.0, 1.0, -0.5, 1.0]))
    U, lam = inverse_cholesky(H, 0.01)
    assert lam > 0.01 and torch.isfinite(U).all()


@pytest.mark.parametrize("method", ["billm", "arb", "x", "rc"])
def test_report_errors_match_direct_computation(method):
    W, X, H = problem()
    res, row = binarize_linear(W, H, BinarizeConfig(method=method, cgb=True, iters=4, x_iters=4, blocksize=32))
    What = res.dequantize()
    assert What.shape == W.shape and torch.isfinite(What).all()
    direct_w = float(((W - What) ** 2).sum() / (W**2).sum())
    direct_o = float(((X @ W.T - X @ What.T) ** 2).sum() / ((X @ W.T) ** 2).sum())
    assert row["weight_err"] == pytest.approx(direct_w, rel=1e-4)
    assert row["output_err"] == pytest.approx(direct_o, rel=1e-3)
    assert 0 < row["output_err"] < 1


def test_binarized_methods_order_on_output_error():
    """On calibration-shaped inputs: every Hessian method beats plain sign; ARB beats BiLLM."""
    W, X, H = problem(64, 128, 600, seed=1)
    errs = {m: binarize_linear(W, H, BinarizeConfig(method=m, cgb=True, iters=15, x_iters=15))[1]["output_err"]
            for m in ("sign", "billm", "arb", "x", "rc")}
    assert max(errs["billm"], errs["arb"], errs["x"], errs["rc"]) < errs["sign"]
    assert errs["arb"] < errs["billm"]


def test_dead_inputs_are_zeroed_not_nan():
    W, X, H = problem()
    H[:, 5] = 0
    H[5, :] = 0
    res, row = binarize_linear(W, H, BinarizeConfig(method="rc", cgb=True, iters=2, blocksize=32))
    assert torch.isfinite(res.dequantize()).all()


def test_bad_inputs_raise_clear_errors():
    W, _, H = problem()
    cfg = BinarizeConfig(method="rc")
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ArbqError, match="NaN"):
        binarize_linear(bad, H, cfg, name="layer 3 q")
    with pytest.raises(ArbqError, match="does not match"):
        binarize_linear(W, H[:10, :10], cfg)
    with pytest.raises(ArbqError, match="needs calibration"):
        binarize_linear(W, None, cfg)


@pytest.mark.parametrize("scale_dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["rc", "x", "billm"])
def test_fit_is_exactly_what_pack_stores(method, scale_dtype):
    """Scales and means are rounded to the storage dtype inside the block loop, so the packed linear
    dequantizes to exactly the fake-quant weight (and the error compensation saw those values)."""
    from arbq.methods.registry import scheme_for
    from arbq.packed.codec import dequantize_packed, pack_linear

    torch.manual_seed(0)
    W = torch.randn(48, 80) * 0.05
    X = torch.randn(256, 80)
    cfg = BinarizeConfig(method=method, cgb=True, iters=3, x_iters=3, blocksize=32, scale_dtype=scale_dtype)
    res, _ = binarize_linear(W, 2 / 256 * X.T @ X, cfg)
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[scale_dtype]
    for t in (res.alpha, res.mu, res.col_scale):
        assert torch.equal(t, t.to(dt).float())
    packed = pack_linear(res, scheme_for(method, True), scale_dtype)
    assert torch.equal(dequantize_packed(packed), res.dequantize())
    unrounded, _ = binarize_linear(W, 2 / 256 * X.T @ X, cfg.replace(scale_dtype="fp32"))
    assert not torch.equal(unrounded.alpha, unrounded.alpha.to(dt).float())
