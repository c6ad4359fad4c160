"""End to end on the real fixture model (SmolLM2-135M) with a small calibration set.

Calibrate on botchan.txt[0:80%], binarize sign / billm / rc+cgb sequentially, and measure
perplexity (GPTQ protocol, seqlen 2048) on the held-out botchan.txt[80%:100%]."""

import json
import math

import pytest

from arbq.fileio import read_json
from arbq.methods.config import load_recipe
from arbq.stages.binarize import run_binarize
from arbq.stages.calibrate import run_calibrate
from arbq.stages.evaluate import run_eval

pytestmark = pytest.mark.fixture

NSAMPLES, SEQLEN = 8, 256
HELD_OUT = "@0.8:1"


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory, real_model_dir, botchan):
    """{name: RUN dir} for sign, billm and rc+cgb on the same calibration samples."""
    root = tmp_path_factory.mktemp("real")
    cal = root / "cal"
    run_calibrate(str(real_model_dir), cal, data=f"{botchan}@0:0.8", nsamples=NSAMPLES, seqlen=SEQLEN, stats=False)
    runs = {}
    for name in ("sign", "billm", "rc-cgb"):
        run_binarize(str(real_model_dir), root / name, load_recipe(name), calib=cal)
        runs[name] = root / name
    return runs


@pytest.fixture(scope="session")
def held_out_ppl(real_runs, real_model_dir, botchan, tmp_path_factory):
    out = {}
    for name, model in [("fp", real_model_dir)] + [(k, v / "model-fake") for k, v in real_runs.items()]:
        res = run_eval(str(model), ppl=[f"{botchan}{HELD_OUT}"], tasks=[], seqlen=2048)
        row = res["perplexity"][0]
        assert row["seqlen"] == 2048 and row["windows"] >= 5
        out[name] = row["ppl"]
    return out


def test_real_model_perplexity_orders_as_in_the_paper(held_out_ppl):
    p = held_out_ppl
    print("held-out botchan ppl @2048:", {k: round(v, 2) for k, v in p.items()})
    assert all(math.isfinite(v) for v in p.values())
    assert p["fp"] < p["rc-cgb"] < p["billm"] < p["sign"]
    assert p["rc-cgb"] < 20 * p["fp"]           # "good settings: 7-20x" even with 8 x 256 calibration


def test_real_run_files_and_report(real_runs):
    run = real_runs["rc-cgb"]
    info = read_json(run / "run.json")
    assert info["num_layers"] == 30 and info["recipe"]["method"] == "rc" and info["recipe"]["cgb"]
    rows = [json.loads(line) for line in (run / "report.jsonl").read_text().splitlines()]
    assert len(rows) == 30 * 7
    assert all(0 < r["output_err"] < 1 and 0 < r["salient_frac"] < 0.5 for r in rows)
    assert len(list((run / "layers").glob("layer_*.safetensors"))) == 30


def test_real_packed_model_matches_fake_quant(real_runs, held_out_ppl, botchan, tmp_path):
    """`arbq pack` of the real rc+cgb run runs from the bits and gives the fake-quant perplexity to
    4 significant digits (scales were rounded to fp16 inside the fit, so both hold the same binarized
    weights; --dtype fp32 keeps embeddings and lm_head as model-fake has them — the default fp16 adds
    ≈1e-4 relative on the fixture model). The two numbers are only compared with each other, so one
    2048-token window each is enough (the six-window packed run cost ≈ 25 s more)."""
    from arbq.stages.pack import run_pack

    packed = tmp_path / "packed"
    report = run_pack([real_runs["rc-cgb"]], packed, dtype="fp32")
    assert report["binarized"]["bpw_honest"] < 3.2
    rows = [run_eval(str(m), ppl=[f"{botchan}{HELD_OUT}"], tasks=[], seqlen=2048, max_windows=1)["perplexity"][0]
            for m in (packed, real_runs["rc-cgb"] / "model-fake")]
    assert [r["windows"] for r in rows] == [1, 1]
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=5e-5)   # 4 significant digits, with margin
    assert rows[1]["ppl"] < 2 * held_out_ppl["rc-cgb"]                   # the same model as the six-window row
