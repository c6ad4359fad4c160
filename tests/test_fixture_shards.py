"""Sharded jobs on the real fixture model (SmolLM2-135M, 30 layers), as in README's Slurm example:
one `calibrate`, two `binarize --no-sequential --layers` jobs into separate run dirs, one `pack`
of both; the packed model must equal the one packed from a single unsharded run."""

import pytest
import torch
from safetensors.torch import load_file

from arbq.methods.config import BinarizeConfig
from arbq.packed.loader import load
from arbq.stages.binarize import run_binarize
from arbq.stages.calibrate import run_calibrate
from arbq.stages.pack import run_pack

pytestmark = pytest.mark.fixture


def test_two_layer_shards_pack_into_the_single_run_model(tmp_path, real_model_dir, botchan, monkeypatch):
    monkeypatch.setenv("ARBQ_KERNEL", "torch")        # exact and build-free; the C++ kernel has its own tests
    model = str(real_model_dir)
    cal = tmp_path / "cal"
    run_calibrate(model, cal, data=f"{botchan}@0:0.8", nsamples=2, seqlen=64)
    cfg = BinarizeConfig(method="sign", cgb=False, sequential=False)
    for name, layers in (("run0", "0:15"), ("run1", "15:30"), ("whole", None)):
        run_binarize(model, tmp_path / name, cfg, calib=cal, layers=layers)
    assert not (tmp_path / "run0" / "model-fake").exists()            # a shard alone is not a model
    run_pack([tmp_path / "run0", tmp_path / "run1"], tmp_path / "packed", dtype="fp32")
    run_pack([tmp_path / "whole"], tmp_path / "packed-whole", dtype="fp32")
    a = load_file(tmp_path / "packed" / "model.safetensors")
    b = load_file(tmp_path / "packed-whole" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # every tensor, bit for bit
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sharded = load(tmp_path / "packed")(ids).logits
        whole = load(tmp_path / "packed-whole")(ids).logits
    assert torch.isfinite(sharded).all() and torch.equal(sharded, whole)
