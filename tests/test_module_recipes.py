"""Per-module recipes (overrides and ignore) and the gptq baseline through binarize → pack → load, on a
tiny random Llama: each module packed in its own method's layout, logits equal the fake-quant model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import arbq
from arbq.errors import ArbqError
from arbq.methods.config import BinarizeConfig, load_recipe
from arbq.packed.binary_linear import BinaryLinear
from arbq.stages.binarize import run_binarize
from arbq.stages.pack import run_pack
from arbq.stages.run_dir import RunDir

CAL = dict(nsamples=3, seqlen=48, seed=0)
MIXED = {"binarize": {
    "method": "rc", "cgb": True, "iters": 2, "blocksize": 32,
    "overrides": [{"targets": ["re:.*mlp\\.down_proj"], "method": "gptq", "bits": 4, "group": 32},
                  {"targets": ["model.layers.1.self_attn.o_proj"], "method": "sign"},
                  {"targets": ["layers.1.mlp.down_proj"], "bits": 2}],
    "ignore": ["model.layers.0.self_attn.q_proj"]}}


@pytest.fixture(autouse=True)
def torch_kernel(monkeypatch):
    monkeypatch.setenv("ARBQ_KERNEL", "torch")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, botchan):
    from conftest import save_tiny

    root = tmp_path_factory.mktemp("mixed")
    model_dir = save_tiny(root / "tiny")
    (root / "mixed.yaml").write_text(yaml.safe_dump(MIXED))
    cfg = load_recipe(str(root / "mixed.yaml"))
    rows = run_binarize(str(model_dir), root / "run", cfg, data=str(botchan), **CAL)
    rep = run_pack([root / "run"], root / "packed", dtype="fp32", json_out=root / "size.json")
    return {"root": root, "rows": rows, "report": rep}


def test_for_module_resolves_overrides_in_order_and_ignore():
    cfg = BinarizeConfig().replace(**MIXED["binarize"])
    assert cfg.for_module("model.layers.0.self_attn.q_proj") is None
    assert cfg.for_module("model.layers.0.self_attn.k_proj").label() == "rc+cgb"
    assert cfg.for_module("model.layers.0.mlp.down_proj").label() == "gptq-4b-g32"
    assert cfg.for_module("model.layers.1.mlp.down_proj").label() == "gptq-2b-g32"   # later override wins
    assert cfg.for_module("model.layers.1.self_attn.o_proj").label() == "sign"
    assert cfg.for_module("model.layers.10.self_attn.o_proj").label() == "rc+cgb"    # full name, not a prefix


def test_each_module_is_packed_in_its_methods_layout(mixed):
    q = json.loads((mixed["root"] / "packed" / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 2 and set(q) == {"quant_method", "format_version", "bit_order", "modules"}
    mods = q["modules"]
    assert "model.layers.0.self_attn.q_proj" not in mods and len(mods) == 13
    assert mods["model.layers.0.mlp.down_proj"]["layout"] == "uniform"
    assert mods["model.layers.1.mlp.down_proj"]["params"]["bits"] == 2
    assert mods["model.layers.1.self_attn.o_proj"]["params"] == {**mods["model.layers.1.self_attn.o_proj"]["params"],
                                                                 "rc": False, "salient": False, "group": False}
    assert mods["model.layers.1.self_attn.q_proj"]["method"] == "rc+cgb"
    by = mixed["report"]["binarized"]["by_method"]
    assert {k: v["linears"] for k, v in by.items()} == {"rc+cgb": 10, "gptq-4b-g32": 1, "gptq-2b-g32": 1, "sign": 1}
    # down_proj 64x96: 4-bit codes, an fp16 scale per 32 columns, 3 zero points of 4 bits per row padded to 2 bytes
    assert by["gptq-4b-g32"]["bpw_honest"] == pytest.approx(4 + 16 / 32 + 16 / 96)
    assert mixed["report"]["binarized"]["measured_equals_formula"]
    rows = {(r["layer"], r["module"]): r["method"] for r in mixed["rows"]}
    assert rows[(0, "mlp.down_proj")] == "gptq-4b-g32" and (0, "self_attn.q_proj") not in rows


def test_mixed_packed_model_runs_from_the_bits_like_its_fake_quant_model(mixed):
    model = arbq.load(mixed["root"] / "packed")
    layers = model.model.layers
    assert type(layers[0].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(layers[0].mlp.down_proj, BinaryLinear) and layers[0].mlp.down_proj.spec.layout == "uniform"
    fake = AutoModelForCausalLM.from_pretrained(RunDir(mixed["root"] / "run").fake_dir).eval()
    orig = AutoModelForCausalLM.from_pretrained(mixed["root"] / "tiny").eval()
    assert torch.equal(fake.model.layers[0].self_attn.q_proj.weight, orig.model.layers[0].self_attn.q_proj.weight)
    ids = torch.randint(0, 1000, (2, 11), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(model, ids), _logits(fake, ids), atol=1e-5, rtol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(mixed["root"] / "packed", dtype=torch.float32)
    assert torch.allclose(_logits(hf, ids), _logits(fake, ids), atol=1e-5, rtol=1e-5)


def test_gptq_alone_from_the_cli_flags(tmp_path, tiny_llama_dir, botchan):
    cfg = load_recipe(None).replace(method="gptq", bits=3, group=24, blocksize=32)
    run_binarize(str(tiny_llama_dir), tmp_path / "run", cfg, data=str(botchan), **CAL)
    rep = run_pack([tmp_path / "run"], tmp_path / "packed", dtype="fp32")
    b = rep["binarized"]
    assert list(b["by_method"]) == ["gptq-3b-g24"] and b["bpw_paper"] == 3.0
    assert 3.6 < b["bpw_honest"] < 4.0     # 3 + 16/24 + zero points (3 bits per 24, rows padded to bytes)
    model = arbq.load(tmp_path / "packed")
    fake = AutoModelForCausalLM.from_pretrained(RunDir(tmp_path / "run").fake_dir).eval()
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_logits(model, ids), _logits(fake, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    ({"blocksize": "abc"}, "blocksize must be int"),
    ({"cgb": "false"}, "cgb must be bool"),
    ({"iters": True}, "iters must be int"),
    ({"method": "nope"}, "unknown method"),
    ({"overrides": [{"targets": ["o_proj"], "method": "nope"}]}, "unknown method"),
    ({"overrides": [{"targets": ["o_proj"], "method": "rc", "bits": 3}]}, "bits, which method rc does not read"),
    ({"overrides": [{"targets": ["o_proj"], "group": 3}]}, "group, which method rc does not read"),
    ({"overrides": [{"targets": ["o_proj"], "sequential": False}]}, "cannot be set per module"),
    ({"overrides": [{"method": "sign"}]}, "targets"),
    ({"overrides": [{"targets": ["re:("], "method": "sign"}]}, "bad regular expression"),
    ({"ignore": "q_proj"}, "ignore must be a list"),
    ({"method": "gptq", "bits": 5}, "bits must be one of"),
])
def test_bad_recipes_are_refused_when_read(tmp_path, bad, match):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"binarize": bad}))
    with pytest.raises(ArbqError, match=match):
        load_recipe(str(path))


def test_stacked_override_on_a_module_whose_method_does_not_read_it_is_refused_before_any_work():
    cfg = BinarizeConfig().replace(overrides=[{"targets": ["down_proj"], "method": "gptq"},
                                              {"targets": ["re:.*_proj"], "bits": 3}])
    cfg.check_modules(["model.layers.0.mlp.down_proj"])
    with pytest.raises(ArbqError, match="q_proj gets bits from an override"):
        cfg.check_modules(["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"])


def test_shipped_recipes_are_found_by_name():
    assert load_recipe("rc-cgb").label() == "rc+cgb" and load_recipe("sign").method == "sign"


def test_a_flag_only_other_methods_read_is_refused_unless_an_override_method_reads_it():
    with pytest.raises(ArbqError, match="bits is read by gptq, not by method rc"):
        BinarizeConfig().with_flags(bits=3)
    with pytest.raises(ArbqError, match="nm_cfs is read by pbs2p, stbllm, not by method rc"):
        BinarizeConfig().with_flags(nm_cfs=1, cgb=True)
    mixed = BinarizeConfig().replace(overrides=[{"targets": ["down_proj"], "method": "gptq"}])
    assert mixed.with_flags(bits=3).with_override(mixed.overrides[0]).bits == 3   # the override inherits it
    assert BinarizeConfig().with_flags(bits=None, tune_epochs=2, sequential=True).tune_epochs == 2   # stage keys
    assert BinarizeConfig(method="pbs2p").with_flags(nm="5:8", nm_cfs=1).nm_cfs == 1
