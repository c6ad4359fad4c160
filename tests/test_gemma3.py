"""Gemma 3: text checkpoints (`gemma3_text`) and the language model of multimodal ones (`gemma3`).

Tiny random models (conftest.tiny_config): layer 0 is a sliding-window layer (16 tokens, its own rotary
base), layer 1 a full-attention one; calibration windows are 48 tokens, so a wrong mask or rotary table
for either kind changes the layer outputs.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file
from test_scaling import checkpoint, stats_bytes
from test_stages import cli, layer_results

from arbq.methods.config import BinarizeConfig
from arbq.models import layerwise
from arbq.models.lazy import LazyModel, open_layerwise
from arbq.models.loading import load_model, resolve
from arbq.stages.binarize import run_binarize
from arbq.stages.calibrate import run_calibrate

CAL = dict(nsamples=3, seqlen=48, seed=0)
TYPES = ["gemma3_text", "gemma3"]
VISION = ("vision_tower.", "multi_modal_projector.")     # checkpoint key prefixes of the multimodal extras


@pytest.fixture(scope="module", params=TYPES)
def tiny_gemma(request, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp(request.param) / "m", model_type=request.param)


def _layer_outputs(model, layers, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output [S, D] in one full forward of `ids` [1, S]."""
    outs = []
    hooks = [layer.register_forward_hook(lambda _m, _a, y: outs.append((y[0] if isinstance(y, tuple) else y)[0]))
             for layer in layers]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("lazy", [True, False])
def test_layer_by_layer_equals_a_full_forward(tiny_gemma, lazy):
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    full, spec = load_model(resolve(str(tiny_gemma)))
    want = [_layer_outputs(full, full.get_submodule(spec.layers), ids[i: i + 1]) for i in range(2)]
    net = open_layerwise(resolve(str(tiny_gemma)), lazy=lazy)
    assert net.lazy is lazy and [k for k in net.config.get_text_config().layer_types] == \
        ["sliding_attention", "full_attention"]
    x, kwargs = net.layer0_inputs(ids, "cpu", None)
    assert kwargs.for_layer(net.layers[0]) is not kwargs.for_layer(net.layers[1])   # mask and rotary differ
    for i in range(len(net)):
        layer = net.load_layer(i, "cpu")
        if i == 1:    # layer 0's kwargs (a sliding mask, the local rotary table) would give other outputs
            wrong = layerwise.forward_layer(layer, x, dict(kwargs))
            assert not torch.allclose(wrong[0], want[0][1], atol=1e-4)
        x = layerwise.forward_layer(layer, x, kwargs)
        net.free_layer(i)
        for s in range(2):
            torch.testing.assert_close(x[s], want[s][i], rtol=1e-5, atol=1e-5)


def test_lazy_never_reads_the_vision_tower(tmp_path):
    model_dir = save_tiny(tmp_path / "mm", model_type="gemma3")
    net = open_layerwise(resolve(str(model_dir)))
    assert isinstance(net, LazyModel) and net.spec.layers == "model.language_model.layers"
    assert net.keymap["model.language_model.layers.1.mlp.down_proj.weight"] == \
        "language_model.model.layers.1.mlp.down_proj.weight"       # the checkpoint's own (v4) key layout
    net.load_stem("cpu")
    tower = [p for n, p in net.model.named_parameters() if n.startswith(("model.vision_tower", "model.multi_modal"))]
    assert tower and all(p.device.type == "meta" for p in tower)
    assert net.model.get_input_embeddings().weight.device.type == "cpu"
    net.free_stem()


@pytest.mark.parametrize("model_type", TYPES)
def test_lazy_and_eager_binarize_bit_identically(tmp_path, botchan, model_type):
    model = str(save_tiny(tmp_path / "m", model_type=model_type))
    original = checkpoint(Path(model))
    for lazy in (True, False):
        run_calibrate(model, tmp_path / f"cal-{lazy}", data=str(botchan), lazy=lazy, **CAL)
    assert stats_bytes(tmp_path / "cal-True") == stats_bytes(tmp_path / "cal-False")
    for cfg in (BinarizeConfig(method="rc", cgb=True, iters=2, blocksize=32),
                BinarizeConfig(method="sign", sequential=False, blocksize=32)):
        runs = {lazy: tmp_path / f"{cfg.method}-{lazy}" for lazy in (True, False)}
        for lazy, run in runs.items():
            rows = run_binarize(model, run, cfg, calib=tmp_path / "cal-True", lazy=lazy)
            assert len(rows) == 2 * 7 and all(r["output_err"] < 1.5 for r in rows)
        assert layer_results(runs[True]) == layer_results(runs[False])
    fake = {lazy: checkpoint(tmp_path / f"rc-{lazy}" / "model-fake") for lazy in (True, False)}
    assert fake[True].keys() >= fake[False].keys()
    assert all(torch.equal(fake[True][k], t) for k, t in fake[False].items())
    extras = [k for k in original if k.startswith(VISION)]
    assert bool(extras) is (model_type == "gemma3")
    assert all(torch.equal(fake[True][k], original[k]) for k in extras)       # vision tower copied unchanged
    layer = "language_model.model.layers.1" if model_type == "gemma3" else "model.layers.1"
    assert not torch.equal(fake[True][f"{layer}.mlp.down_proj.weight"], original[f"{layer}.mlp.down_proj.weight"])


def test_pack_load_eval_generate(tmp_path, botchan, monkeypatch):
    """calibrate → binarize → pack → the packed model's logits equal RUN/model-fake's; eval and generate run."""
    import arbq
    from arbq.stages.pack import run_pack

    monkeypatch.setenv("ARBQ_KERNEL", "torch")
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(1))
    for model_type in TYPES:
        model = save_tiny(tmp_path / model_type, model_type=model_type)
        run = tmp_path / f"run-{model_type}"
        run_binarize(str(model), run, BinarizeConfig(method="rc", cgb=True, iters=2, blocksize=32),
                     data=str(botchan), **CAL)
        packed = tmp_path / f"packed-{model_type}"
        run_pack([run], packed, dtype="fp32", scale_dtype="fp32")
        got = arbq.load(packed)
        fake = AutoModelForCausalLM.from_pretrained(run / "model-fake", dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(got(ids).logits, fake(ids).logits, rtol=1e-5, atol=1e-5)
        q = json.loads((packed / "config.json").read_text())["quantization_config"]
        assert not any("vision" in name for name in q["modules"]) and len(q["modules"]) == 2 * 7
        if model_type == "gemma3":
            original = load_file(model / "model.safetensors")
            tower = {n: p for n, p in got.named_parameters() if n.startswith("model.vision_tower.")}
            assert tower and all(torch.equal(p, original[n[len("model."):]]) for n, p in tower.items())
    res = cli("eval", tmp_path / "packed-gemma3", "--ppl", f"{botchan}@0.9:1", "--seqlen", 32, "--max-windows", 2)
    assert res.returncode == 0, res.stderr
    res = cli("generate", tmp_path / "packed-gemma3_text", "Once upon a time", "--max-new-tokens", 4)
    assert res.returncode == 0, res.stderr
