"""A method is one record: registering a new one (round-to-nearest into the existing "uniform" layout) is
enough for binarize, pack, load and the kernels' fallback — no other table to keep in step."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import arbq
from arbq import kernels
from arbq.methods import registry
from arbq.methods.config import BinarizeConfig
from arbq.methods.gptq import error_row
from arbq.methods.record import MethodRecord
from arbq.methods.uniform_gptq import group_params, quantize_column
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.uniform import UniformResult
from arbq.stages.binarize import run_binarize
from arbq.stages.pack import run_pack
from arbq.stages.run_dir import RunDir


def rtn_fit(W: torch.Tensor, H: torch.Tensor | None, cfg: BinarizeConfig, name: str):
    """Round to nearest per group of cfg.group columns, no error compensation."""
    N, K = W.shape
    G = -(-K // cfg.group)
    codes, scale, zero = torch.zeros(N, K, dtype=torch.uint8), torch.zeros(N, G), torch.zeros(N, G)
    for t in range(G):
        cols = slice(t * cfg.group, min((t + 1) * cfg.group, K))
        scale[:, t], zero[:, t] = group_params(W[:, cols].float(), cfg.bits, cfg.scale_dtype)
        for j in range(cols.start, cols.stop):
            codes[:, j] = quantize_column(W[:, j].float(), scale[:, t], zero[:, t], cfg.bits).to(torch.uint8)
    res = UniformResult(codes, scale, zero.to(torch.uint8), cfg.bits, cfg.group)
    return res, error_row(W.float(), res.dequantize(), H, name, cfg, 0.0)


RTN = MethodRecord(name="rtn", summary="round to nearest", fit=rtn_fit, layout="uniform",
                   layout_params=lambda cfg: {"bits": cfg.bits, "group": cfg.group}, result_type=UniformResult,
                   uses_hessian=False, keys=("bits", "group", "scale_dtype"))


def test_a_new_record_runs_end_to_end(monkeypatch, tmp_path, tiny_llama_dir, botchan):
    monkeypatch.setitem(registry.METHODS, "rtn", RTN)
    monkeypatch.setenv("ARBQ_KERNEL", "auto")
    cfg = BinarizeConfig().replace(method="rtn", bits=4, group=32, blocksize=32)
    rows = run_binarize(str(tiny_llama_dir), tmp_path / "run", cfg, data=str(botchan), nsamples=2, seqlen=32)
    assert {r["method"] for r in rows} == {"rtn"} and all(r["weight_err"] < 0.05 for r in rows)
    rep = run_pack([tmp_path / "run"], tmp_path / "packed", dtype="fp32")
    assert list(rep["binarized"]["by_method"]) == ["rtn"] and rep["binarized"]["measured_equals_formula"]
    model = arbq.load(tmp_path / "packed")
    lin = model.model.layers[0].self_attn.q_proj
    assert isinstance(lin, BinaryLinear) and lin.spec.layout == "uniform"
    x = torch.randn(1, 64)
    assert kernels.pick(lin.packed(), x).NAME == "torch"     # the C++ kernel does not run this layout
    assert kernels.backends_for("uniform") == ["torch"] and "cpu" in kernels.backends_for("binary")
    fake = AutoModelForCausalLM.from_pretrained(RunDir(tmp_path / "run").fake_dir).eval()
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, fake(ids).logits, atol=1e-5, rtol=1e-5)


def test_an_unregistered_method_is_refused_when_the_recipe_is_read():
    from arbq.errors import ArbqError

    with pytest.raises(ArbqError, match="unknown method 'rtn'"):
        BinarizeConfig().replace(method="rtn")


def test_cli_method_help_names_every_registered_method():
    """`arbq binarize --help` lists the methods without importing torch; the list must be the registry's."""
    from arbq import cli

    assert set(cli.METHOD_NAMES) == set(registry.METHODS)
