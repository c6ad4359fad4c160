"""CFS, the coarse stage of pbs2p/stbllm: per-layer N from the calibration's block influence
(arbq.methods.cfs, arbq.models.layerwise.block_influence, `arbq calibrate` + `arbq binarize --nm-cfs`)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import save_tiny

from arbq.errors import ArbqError
from arbq.methods.cfs import allocate_n
from arbq.methods.config import BinarizeConfig
from arbq.models.layerwise import block_influence


@pytest.mark.parametrize("n,m,spread,L", [(6, 8, 1, 30), (4, 8, 2, 32), (5, 8, 1, 7), (2, 4, 1, 5), (6, 8, 1, 2)])
def test_allocation_keeps_the_mean_and_follows_the_ranking(n, m, spread, L):
    rng = random.Random(L * 10 + n)
    scores = [rng.random() for _ in range(L)]
    got = allocate_n(scores, n, m, spread)
    assert sum(got) == n * L                                         # the model-wide mean is the target
    assert all(n - spread <= k <= n + spread for k in got)
    order = sorted(range(L), key=lambda i: scores[i])
    assert [got[i] for i in order] == sorted(got)                    # more influence → never fewer kept
    assert got[order[0]] == n - spread and got[order[-1]] == n + spread


def test_allocation_closed_form():
    """Rank-linear targets n − s … n + s: three layers get n − 1, n, n + 1; five with spread 2 get n − 2 … n + 2."""
    assert allocate_n([0.3, 0.1, 0.2], 5, 8, 1) == [6, 4, 5]
    assert allocate_n([5.0, 1.0, 3.0, 2.0, 4.0], 4, 8, 2) == [6, 2, 4, 3, 5]
    assert allocate_n([0.5, 0.1, 0.9, 0.2], 6, 8, 0) == [6, 6, 6, 6]


@pytest.mark.parametrize("nm,spread", [("6:8", 2), ("1:4", 1), ("6:8", -1)])
def test_spreads_that_leave_the_pattern_range_are_refused(nm, spread):
    with pytest.raises(ArbqError, match="nm_cfs"):
        BinarizeConfig(method="pbs2p", nm=nm, nm_cfs=spread).checked()


def test_nm_cfs_cannot_be_set_per_module():
    with pytest.raises(ArbqError, match="cannot be set per module"):
        BinarizeConfig(method="pbs2p", overrides=({"targets": ["q_proj"], "nm_cfs": 1},)).checked()


class _Scaled(torch.nn.Module):
    """A 'layer' mapping h to h·a + b·e_0 (per token): its influence has a closed form."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, h):
        return (h * self.a + self.b * torch.nn.functional.one_hot(torch.tensor(0), h.shape[-1]),)


def test_block_influence_equals_one_minus_mean_cosine():
    h = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    for a, b in [(2.0, 0.0), (-1.0, 0.0), (1.0, 3.0)]:
        layer = _Scaled(a, b)
        with block_influence(layer) as bi:
            layer(h[:2])
            layer(h[2:])
        y = h * a + b * torch.nn.functional.one_hot(torch.tensor(0), 8)
        want = 1 - torch.nn.functional.cosine_similarity(h.double(), y.double(), dim=-1).mean()
        assert bi() == pytest.approx(float(want), abs=1e-12)
    assert _Scaled(1.0, 0.0)._forward_hooks == {}                      # the hook is gone after the context


@pytest.fixture
def tiny4(tmp_path):
    return save_tiny(tmp_path / "tiny4", num_hidden_layers=4, seed=3)


def test_binarize_with_cfs_gives_each_layer_its_planned_n(tiny4, botchan, tmp_path, arbq_cli):
    """calibrate (records every layer's influence) → binarize pbs2p --nm-cfs 1: run.json records the plan, each
    layer's linears are n_i:8 with the mean the target, a later recipe override of one module wins, modules
    overridden to another method are left alone, and pack writes each module's own n."""
    from arbq.stages.calibrate import load_influence

    calib, run, packed = tmp_path / "calib", tmp_path / "run", tmp_path / "packed"
    r = arbq_cli("calibrate", tiny4, "-o", calib, "--data", botchan, "--nsamples", "4", "--seqlen", "32")
    assert r.returncode == 0, r.stderr
    influence = load_influence(calib, 4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"binarize": {"method": "pbs2p", "nm": "6:8", "nm_cfs": 1, "overrides": [
        {"targets": ["model.layers.1.mlp.down_proj"], "nm": "4:8"},
        {"targets": ["re:.*\\.v_proj"], "method": "gptq", "bits": 4, "group": 32}]}}))
    r = arbq_cli("binarize", tiny4, "-o", run, "--recipe", recipe, "--calib", calib, "--blocksize", "32")
    assert r.returncode == 0, r.stderr
    info = json.loads((run / "run.json").read_text())
    plan = [int(p["nm"].split(":")[0]) for p in info["layer_plan"]["layers"]]
    assert plan == allocate_n(influence, 6, 8, 1) and sum(plan) == 24
    assert info["layer_plan"]["influence"] == influence and info["recipe"]["nm_cfs"] == 0
    r = arbq_cli("pack", run, "-o", packed, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    modules = json.loads((packed / "config.json").read_text())["quantization_config"]["modules"]
    for i, n in enumerate(plan):
        for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
            want = 4 if (i, name) == (1, "mlp.down_proj") else n
            assert modules[f"model.layers.{i}.{name}"]["params"]["n"] == want
        assert modules[f"model.layers.{i}.self_attn.v_proj"]["layout"] == "uniform"
    # a second binarize of the same run with the same recipe resumes (the resolved recipe is the same)
    r = arbq_cli("binarize", tiny4, "-o", run, "--recipe", recipe, "--calib", calib, "--blocksize", "32", "--resume")
    assert r.returncode == 0, r.stderr


def test_cfs_needs_the_calibration_scores(tiny4, botchan, tmp_path, arbq_cli):
    """A calibration without statistics (or from an arbq before the scores) is refused with one line."""
    calib = tmp_path / "calib"
    r = arbq_cli("calibrate", tiny4, "-o", calib, "--data", botchan, "--nsamples", "2", "--seqlen", "16", "--no-stats")
    assert r.returncode == 0, r.stderr
    r = arbq_cli("binarize", tiny4, "-o", tmp_path / "run", "--calib", calib, "--method", "pbs2p", "--nm-cfs", "1")
    assert r.returncode == 2 and "statistics" in r.stderr and "Traceback" not in r.stderr


def test_binarize_calibrates_with_scores_when_cfs_needs_them(tiny4, botchan, tmp_path, arbq_cli):
    """Without --calib, a sequential run that uses CFS calibrates with statistics (the layer scores) itself."""
    run = tmp_path / "run"
    r = arbq_cli("binarize", tiny4, "-o", run, "--method", "pbs2p", "--nm-cfs", "1", "--data", botchan,
                 "--nsamples", "2", "--seqlen", "16", "--blocksize", "32")
    assert r.returncode == 0, r.stderr
    plan = json.loads((run / "run.json").read_text())["layer_plan"]
    assert sum(int(p["nm"].split(":")[0]) for p in plan["layers"]) == 4 * 6 and len(plan["influence"]) == 4
