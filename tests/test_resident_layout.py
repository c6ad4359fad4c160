"""A packed model loaded on the CPU holds each linear once, in the layout its kernel reads in place
(arbq.packed.loader.adopt_resident_forms): "binary" as binary_lut (the same bits). Before, it held the file's
planes plus the lookup kernel's load-time copy of them: about twice the file's bytes per linear."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import save_tiny
from packing_utils import write_run
from transformers import AutoModelForCausalLM

import arbq
from arbq.packed.binary_linear import BinaryLinear
from arbq.stages.pack import run_pack


@pytest.fixture(scope="module")
def lookup(ext):
    if not hasattr(ext, "gemv_lut"):
        pytest.skip("no AVX-512 lookup kernel on this machine")
    return ext


@pytest.fixture(autouse=True)
def cpu_kernel(monkeypatch):
    monkeypatch.setenv("ARBQ_KERNEL", "auto")
    monkeypatch.delenv("ARBQ_CPU_LANES", raising=False)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """{(method, cgb): packed dir} of one tiny Llama with random bits (fp16 scales, fp16 dense parts)."""
    root = tmp_path_factory.mktemp("resident")
    model_dir = save_tiny(root / "tiny")
    out = {}
    for method, cgb in (("rc", True), ("billm", False), ("x", True), ("sign", False)):
        name = f"{method}{'-cgb' if cgb else ''}"
        write_run(root / f"run-{name}", model_dir, method=method, cgb=cgb, blocksize=32)
        run_pack([root / f"run-{name}"], root / name, dtype="fp16")
        out[(method, cgb)] = root / name
    return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def derived_bytes(mod: BinaryLinear) -> list[int]:
    """Sizes of the storages the kernels derived for the module beyond its own buffers."""
    own = {b.untyped_storage().data_ptr() for b in mod.buffers()}
    return [t.untyped_storage().nbytes() for t in _tensors(mod.kernel_cache())
            if t.untyped_storage().data_ptr() not in own]


def _run(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("method,cgb", [("rc", True), ("billm", False), ("x", True)])
def test_cpu_load_holds_the_lookup_layout_once(lookup, packs, method, cgb):
    path = packs[(method, cgb)]
    resident, stored = arbq.load(path, dtype=None), arbq.load(path, dtype=None, resident=False)
    file_modules = json.loads((path / "config.json").read_text())["quantization_config"]["modules"]
    held_modules = resident.config.quantization_config["modules"]
    mods = {n: m for n, m in resident.named_modules() if isinstance(m, BinaryLinear)}
    assert mods and set(mods) == set(file_modules)
    for name, mod in mods.items():
        assert file_modules[name]["layout"] == "binary" and mod.spec.layout == "binary_lut"
        assert held_modules[name] == {**file_modules[name], "layout": "binary_lut", "params": mod.spec.to_params()}
        assert stored.get_submodule(name).spec.layout == "binary"
        assert torch.equal(mod.dequantize(), stored.get_submodule(name).dequantize())
    one, batch = torch.tensor([[5]]), torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    # decode-sized calls run the same lookup on the same tables: equal bits; batched calls dequantize Ŵ exactly
    assert torch.equal(_run(resident, one), _run(stored, one))
    assert torch.allclose(_run(resident, batch), _run(stored, batch), rtol=1e-3, atol=1e-3)
    for name, mod in mods.items():
        cache = mod.kernel_cache()
        assert cache["lut"]["tensors"][0].data_ptr() == mod.codes.data_ptr()      # the codes read in place
        # beyond its buffers the resident layer holds only O(K) tensors (fp32 column scales [4, K], salient
        # indices); the stored one holds a second copy of its sign / group bits in the lookup's order as well
        codes = mod.codes.untyped_storage().nbytes()
        assert sum(derived_bytes(mod)) <= 16 * mod.in_features + 256, name
        assert sum(derived_bytes(stored.get_submodule(name))) >= sum(derived_bytes(mod)) + codes, name
        # the file's bits (second signs as 16-row words instead of byte-padded rows: a few bytes fewer)
        assert sum(b.untyped_storage().nbytes() for b in mod.buffers()) <= \
            sum(b.untyped_storage().nbytes() for b in stored.get_submodule(name).buffers())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_resident_load_releases_the_file_mapping(lookup, packs):
    """Loaded in the stored dtype, tensors are views of the mapped file; once a layer is converted the others are
    copied, so the mapping, and the file pages the conversion read, do not stay resident."""
    import gc

    path = packs[("rc", True)]
    shard = str(next(path.glob("*.safetensors")).resolve())
    model = arbq.load(path, dtype=None)
    gc.collect()
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert shard not in open("/proc/self/maps").read()
    as_stored = arbq.load(path, dtype=None, resident=False)
    gc.collect()
    assert shard in open("/proc/self/maps").read()
    del as_stored


@pytest.mark.parametrize("case", ["sign", "torch backend", "fp32 lanes"])
def test_layers_the_kernel_reads_as_stored_are_not_converted(lookup, packs, monkeypatch, case):
    """sign's lookup reads its own plane; the torch backend and the masked-add lanes read the stored planes."""
    key = ("sign", False) if case == "sign" else ("rc", True)
    if case == "torch backend":
        monkeypatch.setenv("ARBQ_KERNEL", "torch")
    if case == "fp32 lanes":
        monkeypatch.setenv("ARBQ_CPU_LANES", "fp32")
    model = arbq.load(packs[key], dtype=None)
    layouts = {m.spec.layout for m in model.modules() if isinstance(m, BinaryLinear)}
    assert layouts == {"binary"}
    assert {e["layout"] for e in model.config.quantization_config["modules"].values()} == {"binary"}


def test_transformers_from_pretrained_holds_the_lookup_layout_on_the_cpu(lookup, packs):
    """With device_map="cpu" the quantizer converts as arbq.load does; without one the model may still be moved to
    a GPU (whose kernels read the stored layout), so it is left as stored."""
    path = packs[("rc", True)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    ref = arbq.load(path, resident=False)
    lin = hf.model.layers[1].mlp.up_proj
    assert lin.spec.layout == "binary_lut"
    assert hf.config.quantization_config.to_dict()["modules"]["model.layers.1.mlp.up_proj"]["layout"] == "binary_lut"
    unplaced = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert unplaced.model.layers[1].mlp.up_proj.spec.layout == "binary"
    ids = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_run(hf, ids), _run(ref, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flag,layout", [("--resident", "binary_lut"), ("--no-resident", "binary")])
def test_eval_flag_chooses_the_layout_held(lookup, packs, monkeypatch, flag, layout):
    """`arbq eval PACKED --no-resident` keeps the stored layout (its bf16 prefill panels multiply a little faster)."""
    from typer.testing import CliRunner

    from arbq import cli
    from arbq.stages import evaluate

    held = {}
    real = evaluate.load_for_eval

    def spy(model, device="cpu", resident=True):
        net, tok = real(model, device, resident)
        held["layouts"] = {m.spec.layout for m in net.modules() if isinstance(m, BinaryLinear)}
        return net, tok

    monkeypatch.setattr(evaluate, "load_for_eval", spy)
    text = packs[("rc", True)].parent / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    res = CliRunner().invoke(cli.app, ["eval", str(packs[("rc", True)]), "--ppl", str(text), "--seqlen", "64",
                                       "--max-windows", "1", flag])
    assert res.exit_code == 0, res.output
    assert held["layouts"] == {layout}


@pytest.mark.parametrize("nm", [None, "6:8", "4:8"])
def test_a_resident_layer_moved_off_the_cpu_goes_back_to_its_stored_layout(monkeypatch, nm):
    """`arbq.load(path).to("cuda")`: the GPU kernels read the stored layouts, so a layer held in the lookup's
    layout is rearranged back (exactly: the stored tensors again) when it lands off the CPU. Emulated on the CPU by
    declaring every tensor off-CPU; the rearrangement itself runs on the CPU either way."""
    from arbq.kernels.bench import random_packed
    from arbq.packed.layouts import lookup_form

    p = random_packed(37, 128, "rc", True, nm=nm)
    mod = BinaryLinear.from_packed(p)
    mod.adopt(lookup_form(p), restore_off_cpu=True)
    assert mod.spec.layout == ("binary_nm_lut" if nm else "binary_lut")
    mod.to("cpu")                                                 # still on the CPU: kept
    assert mod.spec.layout == ("binary_nm_lut" if nm else "binary_lut")
    monkeypatch.setattr(BinaryLinear, "_off_cpu", staticmethod(lambda t: True))
    mod.to("cpu")
    assert mod.spec == p.spec and set(dict(mod.named_buffers())) == set(p.tensors)
    assert all(torch.equal(getattr(mod, k), t) for k, t in p.tensors.items())
    mod.to("cpu")                                                 # once back, it stays
    assert mod.spec == p.spec
