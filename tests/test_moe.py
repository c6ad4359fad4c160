"""Mixture-of-experts groundwork (arbq.models.moe) on tiny random Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE
models: expert views of the fused parameters, per-expert Hessians against a token-by-token reference,
the no-token rule, and the unfused experts module packed models run from."""

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
    from arbq.models.lazy import Fused, LazyModel, _skeleton, checkpoint_files, map_keys
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
