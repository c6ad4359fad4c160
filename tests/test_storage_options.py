"""Storage options of the binary methods that drop side information (issue 15): `max_salient: 0` (no salient
columns: no second sign, bitmap or salient scales) and `group_split: false` (no magnitude split: no group-bit
plane). Each packs exactly what the fit produced, counts its bits by the closed form, and runs end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from packing_utils import fit_one_thread

import arbq
from arbq.errors import ArbqError
from arbq.methods.config import BinarizeConfig, load_recipe
from arbq.methods.registry import get_method
from arbq.packed import format as fmt
from arbq.packed.layouts import dequantize, layout_of

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
from make_golden import synthetic_problem  # noqa: E402

OPTIONS = {"no-salient": {"max_salient": 0}, "no-split": {"group_split": False}}
PINNED = {"no-salient": 0.0682543, "no-split": 0.1230483}   # measured (1 thread, exact compensation)


@pytest.fixture(scope="module")
def problem():
    return synthetic_problem()


def _fit(problem, method: str, **kw):
    res, row, cfg = fit_one_thread(*problem, method=method, blocksize=64, **kw)
    rec = get_method(method)
    return res, row, layout_of(rec.layout).pack(res, rec.layout_params(cfg), "fp16")


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("method", ["rc", "x", "billm"])
def test_cheaper_layout_stores_only_what_it_uses_and_packs_exactly(problem, method, option):
    res, _, p = _fit(problem, method, **OPTIONS[option])
    n, k = problem[0].shape
    t, s = k // 64, int(res.salient.sum())
    assert (s == 0) == (option == "no-salient") and bool(res.group.any()) == (option == "no-salient")
    names = set(p.tensors) - {"colscale_ns", "colscale_sal"}
    want = {"sign1", "values"} | ({"group"} if option == "no-salient" else {"salient", "sign2"})
    assert names == want
    # closed form: one sign bit per weight, a group plane or the salient residual, values per row and block
    rc = method == "rc"
    if option == "no-salient":        # kind 0, groups 0/1: 2 alphas (+ 2 means)
        values, cols, extra = 2 + (0 if rc else 2), 2 * k, n * k
    else:                             # kind 0 group 0 (1 alpha), kind 1 group 0 (2 alphas); + 2 means
        values, cols, extra = 3 + (0 if rc else 2), (k - s) + 2 * s, n * 8 * -(-s // 8) + k
    closed = n * k + extra + n * t * values * 16 + (cols * 16 if rc else 0)
    measured = fmt.measured_bits(p.tensors)
    assert sum(measured.values()) == sum(fmt.formula_bits(p.spec).values()) == closed
    assert torch.equal(dequantize(p), res.dequantize())          # packed = what the fit's error compensation saw


def test_dropping_side_information_costs_what_it_saves(problem):
    """Output errors on the fixed synthetic layer (1 thread): each option sits between rc+cgb and sign, and
    is pinned within 5% of its measured value so that a regression of either path fails."""
    err = {name: _fit(problem, "rc", **kw)[1]["output_err"] for name, kw in
           {"rc+cgb": {"cgb": True}, "no-salient": OPTIONS["no-salient"], "no-split": OPTIONS["no-split"]}.items()}
    err["sign"] = _fit(problem, "sign")[1]["output_err"]
    assert err["rc+cgb"] < err["no-salient"] < err["sign"] and err["rc+cgb"] < err["no-split"] < err["sign"]
    assert err["no-salient"] == pytest.approx(PINNED["no-salient"], rel=0.05)
    assert err["no-split"] == pytest.approx(PINNED["no-split"], rel=0.05)


@pytest.mark.parametrize("bad,msg", [({"max_salient": -1}, "max_salient"),
                                     ({"cgb": True, "group_split": False}, "group_split"),
                                     ({"group_split": "false"}, "group_split")])
def test_bad_option_values_are_refused(bad, msg):
    with pytest.raises(ArbqError, match=msg):
        BinarizeConfig(method="rc", **bad).checked()


def test_shipped_low_bit_recipe_binarizes_packs_and_runs(tiny_llama_dir, botchan, tmp_path, arbq_cli, monkeypatch):
    """`--recipe rc-nosplit` end to end on a tiny model: the packed model gives the fake-quant logits and
    the size report (bits as the formula counts them) has salient columns and no group plane."""
    monkeypatch.setenv("ARBQ_KERNEL", "torch")
    assert load_recipe("rc-nosplit").group_split is False
    run, packed = tmp_path / "run", tmp_path / "packed"
    r = arbq_cli("binarize", tiny_llama_dir, "-o", run, "--recipe", "rc-nosplit", "--data", botchan,
                 "--nsamples", "4", "--seqlen", "32")
    assert r.returncode == 0, r.stderr
    r = arbq_cli("pack", run, "-o", packed, "--dtype", "fp32", "--json", tmp_path / "size.json")
    assert r.returncode == 0, r.stderr
    import json

    size = json.loads((tmp_path / "size.json").read_text())
    bits = size["binarized"]
    assert bits["measured_equals_formula"] and bits["bpw_measured"]["group_bit"] == 0
    assert bits["bpw_measured"]["sign"] == 1.0 and bits["bpw_measured"]["second_sign"] > 0
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        got = arbq.load(packed)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(run / "model-fake")(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
