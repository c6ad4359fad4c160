"""calibrate and binarize stages on tiny random models: files, resume, architectures, errors."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny

from arbq.methods.config import BinarizeConfig
from arbq.methods.registry import METHODS
from arbq.models.arch import ARCHS
from arbq.stages.binarize import run_binarize
from arbq.stages.calibrate import run_calibrate
from arbq.stages.run_dir import RunDir

CAL = dict(nsamples=3, seqlen=48, seed=0)


def cli(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "arbq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def files_bytes(d: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob(pattern))}


def layer_results(run: Path) -> dict:
    """Every layer's tensors and report rows, timings left out (they are the only thing that may differ)."""
    from safetensors.torch import load_file

    from arbq.fileio import read_info

    out = {}
    for p in sorted((run / "layers").glob("layer_*.safetensors")):
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_info(p)["report"]]
        out[p.name] = ({k: v.numpy().tobytes() for k, v in load_file(p).items()}, rows)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_binarize_every_method_writes_layers_report_and_fake_model(tmp_path, tiny_llama_dir, botchan, method):
    from transformers import AutoModelForCausalLM

    cfg = BinarizeConfig(method=method, cgb=True, iters=2, x_iters=2, blocksize=32)
    rows = run_binarize(str(tiny_llama_dir), tmp_path / "run", cfg, data=str(botchan), **CAL)
    run = RunDir(tmp_path / "run")
    assert len(rows) == 2 * 7 and all(0 < r["weight_err"] < 1.5 for r in rows)
    assert len(run.report.read_text().splitlines()) == 14
    fake = AutoModelForCausalLM.from_pretrained(run.fake_dir).eval()
    res = run.read_layer(1, ["mlp.down_proj"])["mlp.down_proj"]
    torch.testing.assert_close(fake.model.layers[1].mlp.down_proj.weight, res.dequantize())
    with torch.no_grad():
        assert torch.isfinite(fake(torch.arange(10)[None]).logits).all()


def test_calibrate_resume_is_byte_identical(tmp_path, tiny_llama_dir, botchan):
    a, b = tmp_path / "a", tmp_path / "b"
    run_calibrate(str(tiny_llama_dir), a, data=str(botchan), **CAL)
    run_calibrate(str(tiny_llama_dir), b, data=str(botchan), **CAL)
    (b / "stats" / "layer_0001.safetensors").unlink()          # as if killed before layer 1 was written
    (b / "stats" / ".layer_0001.safetensors.tmp-99").write_bytes(b"half")
    run_calibrate(str(tiny_llama_dir), b, data=str(botchan), resume=True, **CAL)
    assert files_bytes(a / "stats", "layer_*") == files_bytes(b / "stats", "layer_*")
    assert len(files_bytes(a / "stats", "layer_*")) == 2


def test_binarize_killed_then_resumed_is_bit_identical(tmp_path, botchan, arbq_cli, one_thread):
    model = save_tiny(tmp_path / "m", num_hidden_layers=6)
    args = ["binarize", model, "--method", "rc", "--cgb", "--data", botchan, "--nsamples", 3, "--seqlen", 48,
            "--iters", 3, "--blocksize", 32]
    ref = arbq_cli(*args, "-o", tmp_path / "ref")      # the uninterrupted and the resumed run in-process
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "arbq.cli", *map(str, args), "-o", str(tmp_path / "b")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    target = random.Random().randint(1, 4)       # kill after a random number of finished layers
    while time.time() < deadline and proc.poll() is None:
        if len(list((tmp_path / "b" / "layers").glob("layer_*.safetensors"))) >= target:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((tmp_path / "b" / "layers").glob("layer_*.safetensors")))
    assert done < 6, "the run finished before it could be killed"
    again = arbq_cli(*args, "-o", tmp_path / "b", "--resume")
    assert again.returncode == 0, again.stderr
    assert len(layer_results(tmp_path / "ref")) == 6
    assert layer_results(tmp_path / "ref") == layer_results(tmp_path / "b")


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_architecture_binarizes(tmp_path, botchan, model_type):
    model = save_tiny(tmp_path / model_type, model_type=model_type)
    cfg = BinarizeConfig(method="rc", cgb=True, iters=1, blocksize=32)
    rows = run_binarize(str(model), tmp_path / "run", cfg, data=str(botchan), **CAL)
    assert len(rows) == 2 * len(ARCHS[model_type].linears)
    assert all(r["output_err"] < 1 for r in rows)


def test_no_sequential_uses_stored_stats_and_shards(tmp_path, tiny_llama_dir, botchan):
    cal = tmp_path / "cal"
    run_calibrate(str(tiny_llama_dir), cal, data=str(botchan), **CAL)
    cfg = BinarizeConfig(method="billm", cgb=False, sequential=False, blocksize=32)
    run_binarize(str(tiny_llama_dir), tmp_path / "s0", cfg, calib=cal, layers="0:1")
    run_binarize(str(tiny_llama_dir), tmp_path / "s1", cfg, calib=cal, layers="1:2")
    run_binarize(str(tiny_llama_dir), tmp_path / "all", cfg, calib=cal)
    assert {**layer_results(tmp_path / "s0"), **layer_results(tmp_path / "s1")} == layer_results(tmp_path / "all")


def one_line_error(res, needle):
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_cli_bad_inputs(tmp_path, tiny_llama_dir, botchan, arbq_cli):
    cli = arbq_cli                      # in-process: the same main(), without a torch start per call
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    base = ["--nsamples", 2, "--seqlen", 32]
    one_line_error(cli("calibrate", tmp_path / "nope", "-o", tmp_path / "c", *base), "model not found")
    one_line_error(cli("calibrate", tiny_llama_dir, "-o", tmp_path / "c", "--data", "imaginary", *base),
                   "unknown dataset")
    one_line_error(cli("calibrate", tiny_llama_dir, "-o", tmp_path / "c", "--data", empty, *base), "empty")
    one_line_error(cli("calibrate", tiny_llama_dir, "-o", tmp_path / "c", "--data", botchan, "--nsamples", 2,
                       "--seqlen", 100000), "context length")
    one_line_error(cli("binarize", tiny_llama_dir, "-o", tmp_path / "r", "--method", "magic"), "unknown method")
    one_line_error(cli("binarize", tiny_llama_dir, "-o", tmp_path / "r", "--recipe", "nope"), "recipe not found")
    # a flag only other methods read is refused, not silently dropped (before any calibration)
    one_line_error(cli("binarize", tiny_llama_dir, "-o", tmp_path / "r", "--method", "rc", "--nm", "6:8"),
                   "nm is read by pbs2p, stbllm, not by method rc")
    one_line_error(cli("binarize", tiny_llama_dir, "-o", tmp_path / "r", "--recipe", "rc-cgb", "--nm-cfs", "1"),
                   "nm_cfs is read by pbs2p, stbllm, not by method rc")
    one_line_error(cli("binarize", tiny_llama_dir, "-o", tmp_path / "r", "--recipe", "gptq-3b-g64", "--cgb"),
                   "cgb is read by")
    assert not (tmp_path / "r").exists()
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    one_line_error(cli("binarize", gpt2, "-o", tmp_path / "g", *base), "unsupported architecture 'gpt2'")
    ok = cli("binarize", tiny_llama_dir, "-o", tmp_path / "r2", "--data", botchan, *base, "--method", "sign")
    assert ok.returncode == 0, ok.stderr
    one_line_error(cli("binarize", tiny_llama_dir, "-o", tmp_path / "r2", "--data", botchan, *base),
                   "already holds a run")
    bad = tmp_path / "r2" / "layers" / "layer_0000.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    one_line_error(cli("pack", tmp_path / "r2", "-o", tmp_path / "p"), "layer")


def test_resume_rewrites_model_fake_after_redoing_a_layer_and_accepts_older_recipes(tmp_path, tiny_llama_dir,
                                                                                      botchan):
    """A layer deleted (or found corrupt) and redone by --resume gets a new model-fake; a run.json written
    before a recipe key existed resumes with that key's default."""
    import json

    cfg = BinarizeConfig(method="sign", blocksize=32)
    run_binarize(str(tiny_llama_dir), tmp_path / "run", cfg, data=str(botchan), **CAL)
    run = RunDir(tmp_path / "run")
    stamp = (run.fake_dir / "config.json").stat().st_mtime_ns
    info = json.loads(run.run_json.read_text())
    del info["recipe"]["act_order"]                       # as written by an arbq without that key
    run.run_json.write_text(json.dumps(info))
    run.layer_path(1).unlink()
    time.sleep(0.01)
    run_binarize(str(tiny_llama_dir), tmp_path / "run", cfg, data=str(botchan), resume=True, **CAL)
    assert run.layer_complete(1) and (run.fake_dir / "config.json").stat().st_mtime_ns != stamp
    assert not list(tmp_path.glob("run/model-fake.*"))


def test_a_run_recorded_before_exact_compensation_resumes_only_as_it_was_made(tmp_path, tiny_llama_dir, botchan):
    """A run.json without `compensation` was binarized with the diagonal compensation: resuming it with the new
    default (exact) would mix the two in one model, so it is refused; --compensation diagonal resumes it."""
    import json
    from dataclasses import replace

    from arbq.errors import ArbqError

    cfg = BinarizeConfig(method="rc", blocksize=32, iters=1)
    run_binarize(str(tiny_llama_dir), tmp_path / "run", cfg, data=str(botchan), **CAL)
    run = RunDir(tmp_path / "run")
    info = json.loads(run.run_json.read_text())
    del info["recipe"]["compensation"]
    run.run_json.write_text(json.dumps(info))
    run.layer_path(1).unlink()
    with pytest.raises(ArbqError, match="recipe differs .compensation: diagonal vs exact."):
        run_binarize(str(tiny_llama_dir), tmp_path / "run", cfg, data=str(botchan), resume=True, **CAL)
    run_binarize(str(tiny_llama_dir), tmp_path / "run", replace(cfg, compensation="diagonal"), data=str(botchan),
                 resume=True, **CAL)
    assert run.layer_complete(1)
