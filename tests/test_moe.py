"""Mixture-of-experts models (arbq.models.moe) on tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE
models: expert views of the fused parameters, per-expert Hessians against a token-by-token reference,
the no-token rule, the unfused experts module packed models run from; and end to end, every family
binarized, packed and run from the bits (logits = the fake-quant model's), an expert without calibration
tokens, and --no-sequential from calibrate's per-expert statistics."""

import json

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file

from arbq.models import layerwise, moe

FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
SPEC = moe.MoESpec()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_moe(request, tmp_path_factory):
    """(family, saved dir, model loaded in float32 eval mode)."""
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path_factory.mktemp(request.param) / "m", model_type=request.param,
                     **FAMILIES[request.param])
    return request.param, path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ckpt_key(family: str, layer: int, e: int, proj: str) -> str:
    """The per-expert checkpoint key (transformers fuses these into the 3-D parameters when loading)."""
    if family == "mixtral":
        w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
        return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


def test_expert_views_are_the_checkpoint_tensors_and_write_in_place(tiny_moe):
    family, path, model = tiny_moe
    ck = load_file(path / "model.safetensors")
    layer = model.model.layers[1]
    experts = moe.fused_experts(layer, SPEC)
    lin = moe.expert_linears(layer, SPEC)
    assert len(lin) == 4 * 3 and list(lin)[:2] == ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"]
    for el in lin.values():
        torch.testing.assert_close(el.weight, ck[_ckpt_key(family, 1, el.expert, el.proj)], rtol=0, atol=0)
    assert (lin["mlp.experts.2.down_proj"].out_features, lin["mlp.experts.2.down_proj"].in_features) == \
        tuple(experts.down_proj.shape[1:])
    before_gu, before_down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    w = lin["mlp.experts.2.up_proj"].weight
    assert w.untyped_storage().data_ptr() == experts.gate_up_proj.untyped_storage().data_ptr()   # a view
    new = torch.randn_like(w)
    w.data.copy_(new)                                  # how the stages write Ŵ back
    half = before_gu.shape[1] // 2
    assert torch.equal(experts.gate_up_proj[2, half:], new)
    changed = (experts.gate_up_proj != before_gu).any(dim=-1)
    assert changed[2, half:].all() and not changed[2, :half].any() and not changed[[0, 1, 3]].any()
    assert torch.equal(experts.down_proj, before_down)
    experts.gate_up_proj.data.copy_(before_gu)


def _reference_hessians(family, model, ck, layer_idx, hidden):
    """Token by token: route each MoE-block input x_t by the router's top-k, add x_t x_tᵀ and m m^T
    (m = act(W_gate x_t) ⊙ W_up x_t, from the checkpoint's per-expert tensors) to the chosen experts."""
    layer = model.model.layers[layer_idx]
    router = layer.get_submodule(SPEC.router).weight.double()
    k = model.config.num_experts_per_tok
    act = moe.fused_experts(layer, SPEC).act_fn
    n_exp = router.shape[0]
    d, i = hidden.shape[-1], ck[_ckpt_key(family, layer_idx, 0, "down_proj")].shape[1]
    h_in, h_mid = torch.zeros(n_exp, d, d, dtype=torch.float64), torch.zeros(n_exp, i, i, dtype=torch.float64)
    count = [0] * n_exp
    for x in hidden.reshape(-1, d).double():
        for e in torch.topk(router @ x, k).indices.tolist():
            g, u = (ck[_ckpt_key(family, layer_idx, e, p)].double() for p in ("gate_proj", "up_proj"))
            m = act(g @ x) * (u @ x)
            h_in[e] += torch.outer(x, x)
            h_mid[e] += torch.outer(m, m)
            count[e] += 1
    return h_in, h_mid, count


def test_expert_hessians_equal_a_token_by_token_reference(tiny_moe):
    family, path, model = tiny_moe
    ck = load_file(path / "model.safetensors")
    ids = torch.randint(0, 49152, (3, 24), generator=torch.Generator().manual_seed(0))
    x, kwargs = layerwise.capture_inputs(model, model.model.layers, ids)
    layer = model.model.layers[0]
    block_in = []
    hook = layer.get_submodule("mlp").register_forward_pre_hook(lambda _m, a: block_in.append(a[0].detach()))
    try:
        stats, y = moe.accumulate_expert_hessians(layer, SPEC, x, kwargs, dtype=torch.float64)
    finally:
        hook.remove()
    torch.testing.assert_close(y, layerwise.forward_layer(layer, x, kwargs), rtol=0, atol=0)  # the layer ran as is
    h_in, h_mid, count = _reference_hessians(family, model, ck, 0, torch.cat(block_in))
    assert sum(count) == 3 * 24 * 2 and stats.tokens == dict(enumerate(count))
    for e in range(4):
        assert count[e] > 0 and stats.rule[f"mlp.experts.{e}.down_proj"] == "routed"
        for proj, ref in (("gate_proj", h_in[e]), ("up_proj", h_in[e]), ("down_proj", h_mid[e])):
            got = stats.hessians[f"mlp.experts.{e}.{proj}"]
            assert got.dtype == torch.float32 and got.shape == ref.shape
            torch.testing.assert_close(got.double(), 2.0 / count[e] * ref, rtol=1e-4, atol=1e-5)


def test_an_expert_without_tokens_gets_a_damped_identity(tiny_moe, monkeypatch):
    from arbq.methods.config import BinarizeConfig
    from arbq.methods.gptq import binarize_linear

    family, _, model = tiny_moe
    layer = model.model.layers[0]
    router = layer.get_submodule(SPEC.router)
    original = router.forward

    def never_expert_3(hidden):           # the same router, with expert 3 never chosen
        logits, _, _ = original(hidden)
        probs = torch.softmax(logits.float(), dim=-1)
        probs[:, 3] = -1
        top, index = torch.topk(probs, router.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), index

    monkeypatch.setattr(router, "forward", never_expert_3)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    x, kwargs = layerwise.capture_inputs(model, model.model.layers, ids)
    stats, _ = moe.accumulate_expert_hessians(layer, SPEC, x, kwargs, keep=False)
    assert stats.tokens[3] == 0 and all(stats.tokens[e] > 0 for e in range(3))
    for proj in moe.PROJECTIONS:
        name = f"mlp.experts.3.{proj}"
        assert torch.equal(stats.hessians[name], torch.eye(stats.hessians[name].shape[0]))
        assert moe.expert_report(stats, name) == {"expert": 3, "tokens": 0, "hessian": moe.NO_TOKEN_RULE}
    assert moe.expert_report(stats, "mlp.experts.0.up_proj")["hessian"] == "routed"
    w = moe.expert_linears(layer, SPEC)["mlp.experts.3.gate_proj"].weight
    res, row = binarize_linear(w.clone(), stats.hessians["mlp.experts.3.gate_proj"], BinarizeConfig(method="sign"),
                               name="expert 3")
    assert torch.isfinite(res.dequantize()).all() and 0 < row["weight_err"] < 1


def test_only_chosen_experts_and_projections_are_summed(tiny_moe):
    _, _, model = tiny_moe
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(2))
    x, kwargs = layerwise.capture_inputs(model, model.model.layers, ids)
    layer = model.model.layers[1]
    dense = {"self_attn.q_proj": layer.self_attn.q_proj}
    full, _ = moe.accumulate_expert_hessians(layer, SPEC, x, kwargs, dense=dense, keep=False)
    alone, _ = layerwise.accumulate_hessians(layer, dense, x, kwargs, keep=False)
    assert torch.equal(full.hessians["self_attn.q_proj"], alone["self_attn.q_proj"])     # one pass for both
    assert full.rule["self_attn.q_proj"] == "dense" and len(full.hessians) == 1 + 4 * 3
    part, _ = moe.accumulate_expert_hessians(layer, SPEC, x, kwargs, experts=[1], projections=("down_proj",),
                                             keep=False)
    assert list(part.hessians) == ["mlp.experts.1.down_proj"]
    assert torch.equal(part.hessians["mlp.experts.1.down_proj"], full.hessians["mlp.experts.1.down_proj"])


def test_unfused_experts_run_like_the_fused_ones(tiny_moe):
    """Per-expert linears (what a packed model swaps for BinaryLinear) give the fused model's logits, also
    after every expert was written through its view (the fake-quant model of a binarization)."""
    import copy

    _, _, model = tiny_moe
    model = copy.deepcopy(model)
    for layer in model.model.layers:                # a crude 1-bit stand-in: sign × row mean |w|
        for lin in moe.expert_linears(layer, SPEC).values():
            w = lin.weight
            w.data.copy_(torch.sign(w) * w.abs().mean(dim=1, keepdim=True))
    ids = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        assert moe.unfuse_experts(model.model.layers, SPEC) == 2
        assert isinstance(model.model.layers[0].mlp.experts, moe.UnfusedExperts)
        names = [n for n, _ in model.named_parameters() if ".experts." in n]
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in names and len(names) == 2 * 4 * 3
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_lazy_layers_assemble_the_fused_experts_from_the_checkpoint(tiny_moe):
    """The lazy loader reads one layer's per-expert checkpoint tensors and fuses them as from_pretrained does."""
    from arbq.models.arch import ArchSpec
    from arbq.models.checkpoint import Fused, checkpoint_files, map_keys
    from arbq.models.lazy import LazyModel, _skeleton
    from arbq.models.loading import load_config, resolve

    family, path, model = tiny_moe
    ref = resolve(str(path))
    files = checkpoint_files(ref)
    skeleton = _skeleton(load_config(ref), files)
    keymap = map_keys(skeleton, files)
    fused = keymap["model.layers.1.mlp.experts.gate_up_proj"]
    assert isinstance(fused, Fused) and fused.keys[2] == (_ckpt_key(family, 1, 2, "gate_proj"),
                                                          _ckpt_key(family, 1, 2, "up_proj"))
    net = LazyModel(skeleton, ArchSpec(layers="model.layers", groups=moe.MOE_ARCHS[family][0]), files, keymap)
    got, want = net.load_layer(1, "cpu").state_dict(), model.model.layers[1].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.device.type == "meta" for p in net.layers[0].parameters())
    net.free_layer(1)
    assert all(p.device.type == "meta" for p in net.layers[1].parameters())


# --- end to end: calibrate → binarize → pack → run from the bits -------------------------------------------

CAL = dict(nsamples=3, seqlen=48, seed=0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _expert_rows(rows):
    return [r for r in rows if ".experts." in r["module"]]


def _packs_and_runs_from_the_bits(run, out, ids):
    """Pack `run`, load it with arbq.load: every expert projection is a BinaryLinear and the logits are
    the fake-quant model's (RUN/model-fake loaded as a plain HF model)."""
    from transformers import AutoModelForCausalLM

    import arbq
    from arbq.packed.binary_linear import BinaryLinear
    from arbq.stages.pack import run_pack

    run_pack([run], out, dtype="fp32")
    packed = arbq.load(out)
    experts = packed.model.layers[1].mlp.experts
    assert isinstance(experts, moe.UnfusedExperts)
    assert all(isinstance(getattr(x, p), BinaryLinear) for x in experts for p in moe.PROJECTIONS)
    assert not any(".experts." in n for n, _ in packed.named_parameters())     # no expert weight in full precision
    fake = AutoModelForCausalLM.from_pretrained(run / "model-fake", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(packed, ids), _logits(fake, ids), rtol=0, atol=1e-5)
    return fake


def test_every_moe_family_binarizes_packs_and_runs_from_the_bits(tiny_moe, botchan, tmp_path, monkeypatch):
    """rc+cgb (sequential): a report row per expert projection with its routed tokens; model-fake holds Ŵ in
    the fused parameters (streamed from the checkpoint's per-expert tensors, and the same when written
    eagerly); the packed model's logits are model-fake's."""
    import shutil

    from safetensors.torch import load_file

    from arbq.methods.config import BinarizeConfig
    from arbq.models.arch import arch_for
    from arbq.models.loading import resolve
    from arbq.stages.binarize import run_binarize
    from arbq.stages.fake_model import write_fake_model
    from arbq.stages.run_dir import RunDir

    monkeypatch.setenv("ARBQ_KERNEL", "torch")
    family, path, model = tiny_moe
    spec = arch_for(family, model.config)
    assert spec.moe is not None and spec.groups[-1] == ("mlp.experts.3.down_proj",)
    cfg = BinarizeConfig(method="rc", cgb=True, iters=1, blocksize=32)
    rows = run_binarize(str(path), tmp_path / "run", cfg, data=str(botchan), **CAL)
    assert len(rows) == 2 * len(spec.linears) and all(r["output_err"] < 1 for r in rows)
    experts = _expert_rows(rows)
    assert len(experts) == 2 * 4 * 3 and all(r["hessian"] == moe.NO_TOKEN_RULE if r["tokens"] == 0 else
                                             r["hessian"] == "routed" for r in experts)
    for layer in (0, 1):      # every calibration token goes to top-k = 2 experts
        assert sum(r["tokens"] for r in experts if r["layer"] == layer and r["module"].endswith("gate_proj")) \
            == 3 * 48 * 2
    assert not any("expert" in r for r in rows if ".experts." not in r["module"])
    run = RunDir(tmp_path / "run")
    res = run.read_layer(1, ["mlp.experts.2.up_proj"])["mlp.experts.2.up_proj"]
    fake = _packs_and_runs_from_the_bits(run.root, tmp_path / "packed", torch.randint(0, 49152, (2, 20)))
    w = moe.expert_linears(fake.model.layers[1], SPEC)["mlp.experts.2.up_proj"].weight
    torch.testing.assert_close(w, res.dequantize(), rtol=0, atol=0)
    shutil.copytree(run.root, tmp_path / "eager")                  # model-fake written eagerly: the same tensors
    shutil.rmtree(tmp_path / "eager" / "model-fake")
    write_fake_model(resolve(str(path)), RunDir(tmp_path / "eager"), spec)
    streamed, eager = (load_file(d / "model-fake" / "model.safetensors") for d in (run.root, tmp_path / "eager"))
    assert streamed.keys() == eager.keys() and all(torch.equal(streamed[k], eager[k]) for k in streamed)


def test_an_expert_without_calibration_tokens_is_binarized_reported_packed_and_run(botchan, tmp_path, monkeypatch):
    """A router that never picks expert 3 (the same model otherwise): its rows in report.jsonl say 0 tokens and
    the identity rule (H = I, damped), the others are routed; true-sequential sign binarization; the model
    still packs and runs from the bits like its fake-quant model (same router)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from arbq.methods.config import BinarizeConfig
    from arbq.stages.binarize import run_binarize

    monkeypatch.setenv("ARBQ_KERNEL", "torch")
    family = "qwen2_moe"
    path = save_tiny(tmp_path / "m", model_type=family, **FAMILIES[family])
    skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    router_cls = type(skeleton.model.layers[0].get_submodule(SPEC.router))
    original = router_cls.forward

    def never_expert_3(self, hidden):
        logits, _, _ = original(self, hidden)
        probs = torch.softmax(logits.float(), dim=-1)
        probs[:, 3] = -1
        top, index = torch.topk(probs, self.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), index

    monkeypatch.setattr(router_cls, "forward", never_expert_3)
    cfg = BinarizeConfig(method="sign", true_sequential=True, blocksize=32)
    rows = run_binarize(str(path), tmp_path / "run", cfg, data=str(botchan), **CAL)
    experts = _expert_rows(rows)
    silent = [r for r in experts if r["expert"] == 3]
    assert len(silent) == 2 * 3 and all(r["tokens"] == 0 and r["hessian"] == moe.NO_TOKEN_RULE for r in silent)
    assert all(r["tokens"] > 0 and r["hessian"] == "routed" for r in experts if r["expert"] != 3)
    assert all(0 < r["weight_err"] < 1.5 for r in silent)
    report = [json.loads(line) for line in (tmp_path / "run" / "report.jsonl").read_text().splitlines()]
    assert [r for r in report if r.get("expert") == 3] == silent
    _packs_and_runs_from_the_bits(tmp_path / "run", tmp_path / "packed", torch.randint(0, 49152, (2, 20)))


def test_no_sequential_uses_stored_per_expert_statistics_and_shards(botchan, tmp_path, monkeypatch):
    """calibrate stores per-expert Hessians (and tokens) for MoE layers: --no-sequential runs from them,
    layer shards equal the whole run, layer 0 equals the sequential run's (same inputs), the expert rows carry
    tokens and rule, and the packed shards run from the bits like the whole run's fake-quant model."""
    from test_stages import layer_results
    from transformers import AutoModelForCausalLM

    import arbq
    from arbq.fileio import read_info
    from arbq.methods.config import BinarizeConfig
    from arbq.stages.binarize import run_binarize
    from arbq.stages.calibrate import run_calibrate, stats_path
    from arbq.stages.pack import run_pack

    monkeypatch.setenv("ARBQ_KERNEL", "torch")
    path = save_tiny(tmp_path / "m", model_type="qwen2_moe", **FAMILIES["qwen2_moe"])
    cal = tmp_path / "cal"
    run_calibrate(str(path), cal, data=str(botchan), **CAL)
    info = read_info(stats_path(cal, 1))
    assert sum(v["tokens"] for k, v in info["experts"].items() if k.endswith("gate_proj")) == 3 * 48 * 2
    cfg = BinarizeConfig(method="sign", sequential=False, blocksize=32)
    for name, layers in (("s0", "0:1"), ("s1", "1:2"), ("all", None)):
        rows = run_binarize(str(path), tmp_path / name, cfg, calib=cal, layers=layers)
    assert {**layer_results(tmp_path / "s0"), **layer_results(tmp_path / "s1")} == layer_results(tmp_path / "all")
    experts = _expert_rows(rows)
    assert len(experts) == 2 * 4 * 3 and all(r["tokens"] > 0 and r["hessian"] == "routed" for r in experts)
    assert [(r["expert"], r["tokens"]) for r in experts if r["layer"] == 1 and r["module"].endswith("down_proj")] \
        == [(e, info["experts"][f"mlp.experts.{e}.down_proj"]["tokens"]) for e in range(4)]
    run_binarize(str(path), tmp_path / "seq", BinarizeConfig(method="sign", blocksize=32), calib=cal)
    assert layer_results(tmp_path / "seq")["layer_0000.safetensors"] == \
        layer_results(tmp_path / "all")["layer_0000.safetensors"]
    run_pack([tmp_path / "s0", tmp_path / "s1"], tmp_path / "packed", dtype="fp32")
    ids = torch.randint(0, 49152, (2, 20))
    fake = AutoModelForCausalLM.from_pretrained(tmp_path / "all" / "model-fake", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(arbq.load(tmp_path / "packed"), ids), _logits(fake, ids), rtol=0, atol=1e-5)
