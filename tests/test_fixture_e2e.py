"""End to end on the real fixture model (SmolLM2-135M) with a small calibration set.

Calibrate on botchan.txt[0:80%], binarize rc+cgb sequentially (the shipped rc-cgb recipe with `regroup: 0`:
the group reassignment rounds cost 40% of the fit time, and test_regroup.py pins what they gain on a fixed
synthetic layer) and sign as two sharded `--no-sequential --layers` jobs plus one whole run (sign uses no
calibration statistics, so its sequential and independent runs are the same model), and measure perplexity
(GPTQ protocol, seqlen 2048) on the held-out botchan.txt[80%:100%]. One session fixture serves every test: the
binarizations are the suite's most expensive step. BiLLM's place between them (rc+cgb < billm < sign)
is pinned per linear on a fixed synthetic layer (test_golden.py) instead of by a third real run."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from arbq.fileio import read_json
from arbq.methods.config import BinarizeConfig, load_recipe
from arbq.packed.loader import load
from arbq.stages.binarize import run_binarize
from arbq.stages.calibrate import run_calibrate
from arbq.stages.evaluate import run_eval
from arbq.stages.pack import run_pack

pytestmark = pytest.mark.fixture

NSAMPLES, SEQLEN = 8, 256
HELD_OUT = "@0.8:1"
# FP32 perplexity of the held-out split (6 windows of 2048; measured, as BOTCHAN_PPL_2048_W1 in test_evaluate.py)
FP_HELD_OUT_PPL = 27.20984384431497


@pytest.fixture(scope="session")
def real_runs(tmp_path_factory, real_model_dir, botchan):
    """{name: RUN dir}: rc+cgb, sign (whole) and its two shards, on the same calibration samples."""
    root = tmp_path_factory.mktemp("real")
    cal = root / "cal"
    model = str(real_model_dir)
    run_calibrate(model, cal, data=f"{botchan}@0:0.8", nsamples=NSAMPLES, seqlen=SEQLEN)   # + stats for shards
    runs = {}
    sign = BinarizeConfig(method="sign", cgb=False, sequential=False)
    for name, layers in (("sign-0", "0:15"), ("sign-1", "15:30"), ("sign", None)):
        run_binarize(model, root / name, sign, calib=cal, layers=layers)
        runs[name] = root / name
    run_binarize(model, root / "rc-cgb", replace(load_recipe("rc-cgb"), regroup=0), calib=cal)
    runs["rc-cgb"] = root / "rc-cgb"
    return runs


@pytest.fixture(scope="session")
def held_out_ppl(real_runs, real_model_dir, botchan, tmp_path_factory):
    out = {}
    fake = [(k, real_runs[k] / "model-fake") for k in ("sign", "rc-cgb")]
    for name, model in [("fp", real_model_dir)] + fake:
        windows = 2 if name == "sign" else None       # sign is ~5 orders of magnitude off: two windows tell
        res = run_eval(str(model), ppl=[f"{botchan}{HELD_OUT}"], tasks=[], seqlen=2048, max_windows=windows)
        row = res["perplexity"][0]
        assert row["seqlen"] == 2048 and row["windows"] == (windows or 6)
        out[name] = row["ppl"]
    return out


def test_real_model_perplexity_orders_as_in_the_paper(held_out_ppl):
    p = held_out_ppl
    print("held-out botchan ppl @2048:", {k: round(v, 2) for k, v in p.items()})
    assert all(math.isfinite(v) for v in p.values())
    assert p["fp"] == pytest.approx(FP_HELD_OUT_PPL, rel=1e-4)   # the eval protocol on real text, six windows
    assert p["fp"] < p["rc-cgb"] < p["sign"]
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
    packed = tmp_path / "packed"
    report = run_pack([real_runs["rc-cgb"]], packed, dtype="fp32")
    assert report["binarized"]["bpw_honest"] < 3.2
    rows = [run_eval(str(m), ppl=[f"{botchan}{HELD_OUT}"], tasks=[], seqlen=2048, max_windows=1)["perplexity"][0]
            for m in (packed, real_runs["rc-cgb"] / "model-fake")]
    assert [r["windows"] for r in rows] == [1, 1]
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"], rel=5e-5)   # 4 significant digits, with margin
    assert rows[1]["ppl"] < 2 * held_out_ppl["rc-cgb"]                   # the same model as the six-window row


def test_two_layer_shards_pack_into_the_single_run_model(real_runs, tmp_path, monkeypatch):
    """Sharded jobs as in README's Slurm example: one `calibrate`, two `binarize --no-sequential --layers`
    jobs into separate run dirs, one `pack` of both; the packed model equals the one packed from the
    single unsharded run, every tensor and the logits bit for bit."""
    monkeypatch.setenv("ARBQ_KERNEL", "torch")        # exact and build-free; the C++ kernel has its own tests
    assert not (real_runs["sign-0"] / "model-fake").exists()            # a shard alone is not a model
    run_pack([real_runs["sign-0"], real_runs["sign-1"]], tmp_path / "packed", dtype="fp32")
    run_pack([real_runs["sign"]], tmp_path / "packed-whole", dtype="fp32")
    a = load_file(tmp_path / "packed" / "model.safetensors")
    b = load_file(tmp_path / "packed-whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # every tensor, bit for bit
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sharded = load(tmp_path / "packed")(ids).logits
        whole = load(tmp_path / "packed-whole")(ids).logits
    assert torch.isfinite(sharded).all() and torch.equal(sharded, whole)
