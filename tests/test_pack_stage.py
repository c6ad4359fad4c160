"""`arbq pack` end to end on a tiny random Llama: round trip, size report, sharding, and every refusal."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import save_tiny
from packing_utils import write_run
from transformers import AutoModelForCausalLM

import arbq
from arbq.errors import ArbqError
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.loader import MANIFEST, is_packed
from arbq.stages.generate import run_generate
from arbq.stages.pack import run_pack


@pytest.fixture(autouse=True)
def torch_kernel(monkeypatch):
    monkeypatch.setenv("ARBQ_KERNEL", "torch")   # exact and build-free; the C++ kernel has its own tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    model_dir = save_tiny(root / "tiny")
    results = write_run(root / "run", model_dir, method="rc", cgb=True, blocksize=32)
    packed = root / "packed"
    report = run_pack([root / "run"], packed, dtype="fp32", scale_dtype="fp32", json_out=root / "size.json")
    return {"root": root, "model": model_dir, "results": results, "packed": packed, "report": report}


def _fake_quant(model_dir, results):
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for (i, name), res in results.items():
        ref.model.layers[i].get_submodule(name).weight.data = res.dequantize()
    return ref


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_logits_equal_fake_quant(tiny):
    model = arbq.load(tiny["packed"])
    assert isinstance(model.model.layers[1].mlp.down_proj, BinaryLinear)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    ids = torch.randint(0, 1000, (2, 9))
    want = _logits(_fake_quant(tiny["model"], tiny["results"]), ids)
    assert torch.allclose(_logits(model, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 5])
def test_decode_sized_inputs_equal_fake_quant(tiny, tokens):
    """1 and 5 tokens through the packed model on the torch backend (this module's fixture); the same inputs
    through the C++ lookup kernel are tests/test_cpu_kernel_model.py."""
    model = arbq.load(tiny["packed"])
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    want = _logits(_fake_quant(tiny["model"], tiny["results"]), ids)
    assert torch.allclose(_logits(model, ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["torch", "cpu"])
def test_interleaved_pack_runs_from_its_own_bytes(tiny, tmp_path, monkeypatch, kernel):
    """`arbq pack --interleave`: every rc+cgb linear in the binary_lut layout (the same bits, as the CPU lookup
    kernel reads them); logits equal the binary pack's on the torch backend and on the C++ kernel (batch 1
    lookup, batched Ŵᵀ panels), and the kernel's tensors are the loaded buffers themselves."""
    if kernel == "cpu":
        from arbq.kernels import cpu
        if cpu.extension() is None or not hasattr(cpu.extension(), "dequant_lut"):
            pytest.skip("no AVX-512 C++ kernel on this machine")
    monkeypatch.setenv("ARBQ_KERNEL", kernel)
    out = tmp_path / "lut"
    rep = run_pack([tiny["root"] / "run"], out, dtype="fp32", scale_dtype="fp32", interleave=True)
    q = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert {m["layout"] for m in q.values()} == {"binary_lut"}
    b = rep["binarized"]
    assert b["measured_equals_formula"] and b["bpw_formula"]["sign_and_group"] == pytest.approx(2.0)
    assert b["bpw_honest"] == pytest.approx(tiny["report"]["binarized"]["bpw_honest"], rel=0.01)
    model, ref = arbq.load(out), arbq.load(tiny["packed"])
    lin = model.model.layers[0].self_attn.q_proj
    assert set(dict(lin.named_buffers())) >= {"codes", "sign2", "values"} and not hasattr(lin, "sign1")
    for shape in ((1, 1), (1, 5), (2, 9)):
        ids = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(shape[1]))
        assert torch.allclose(_logits(model, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4), shape
    if kernel == "cpu":
        cache = lin.kernel_cache()
        assert cache["lut"]["tensors"][0].data_ptr() == lin.codes.data_ptr()
    else:                                                 # transformers' own loader, through arbq's quantizer
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert hf.model.layers[1].mlp.up_proj.spec.layout == "binary_lut"
        assert torch.allclose(_logits(hf, ids), _logits(ref, ids), atol=1e-4, rtol=1e-4)


def _mapped(path) -> bool:
    """Whether a file is mapped into this process (/proc/self/maps)."""
    import gc

    gc.collect()
    return str(path.resolve()) in open("/proc/self/maps").read()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_loading_in_another_dtype_releases_the_file_mapping(tiny, tmp_path):
    """Loaded in the stored dtype, every tensor is a view of the mapped file (no copy); loaded in another dtype,
    every tensor is copied, so no view keeps the mapping, and the pages the conversion read, resident next to
    the converted copies."""
    out = tmp_path / "fp16"
    run_pack([tiny["root"] / "run"], out, dtype="fp16", scale_dtype="fp16")
    shard = next(out.glob("*.safetensors"))
    ids = torch.randint(0, 1000, (1, 5))
    as_stored = arbq.load(out, dtype=None)
    assert as_stored.model.embed_tokens.weight.dtype == torch.float16 and _mapped(shard)
    del as_stored
    assert not _mapped(shard)
    converted = arbq.load(out, dtype=torch.float32)
    assert converted.model.embed_tokens.weight.dtype == torch.float32 and not _mapped(shard)
    ref = arbq.load(tiny["packed"])                      # the fp32 pack: the same bits, fp16-rounded dense parts
    assert torch.allclose(_logits(converted, ids), _logits(ref, ids), atol=5e-2, rtol=5e-2)


def test_transformers_from_pretrained_after_import_arbq(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny["packed"], dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, BinaryLinear)
    ids = torch.randint(0, 1000, (1, 7))
    assert torch.allclose(_logits(model, ids), _logits(arbq.load(tiny["packed"]), ids), atol=1e-5)


def test_size_report(tiny):
    rep = json.loads((tiny["root"] / "size.json").read_text())
    b = rep["binarized"]
    assert b["measured_equals_formula"] and b["bpw_measured"] == b["bpw_formula"]
    assert b["linears"] == 2 * 7 and b["bpw_honest"] == pytest.approx(sum(b["bpw_measured"].values()))
    assert 1.0 < b["bpw_paper"] < 1.2 < b["bpw_honest"]
    assert b["bpw_measured"]["sign"] == 1.0 and b["bpw_measured"]["group_bit"] == 1.0
    files = sum(p.stat().st_size for p in tiny["packed"].glob("*.safetensors"))
    assert rep["model"]["packed_bytes"] == files
    cfg = json.loads((tiny["packed"] / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "arbq" and cfg["format_version"] == 2 and cfg["bit_order"] == "little"
    assert len(cfg["modules"]) == 14 and is_packed(tiny["packed"]) and not is_packed(tiny["model"])


def test_fp16_pack_is_close_and_smaller(tiny):
    out = tiny["root"] / "packed16"
    rep = run_pack([tiny["root"] / "run"], out, dtype="fp16", scale_dtype="fp16")
    assert rep["binarized"]["bpw_honest"] < tiny["report"]["binarized"]["bpw_honest"]
    ids = torch.randint(0, 1000, (1, 8))
    a, b = _logits(arbq.load(out), ids), _logits(_fake_quant(tiny["model"], tiny["results"]), ids)
    assert (a - b).abs().max() < 2e-2 * b.abs().max()


def test_shards_and_split_runs(tiny, tmp_path):
    r0, r1 = tmp_path / "r0", tmp_path / "r1"
    res0 = write_run(r0, tiny["model"], layers=[0], seed=5)
    res1 = write_run(r1, tiny["model"], layers=[1], seed=6)
    out = tmp_path / "packed"
    run_pack([r0, r1], out, dtype="fp32", scale_dtype="fp32", max_shard_bytes=1 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.randint(0, 1000, (1, 6))
    want = _logits(_fake_quant(tiny["model"], {**res0, **res1}), ids)
    assert torch.allclose(_logits(arbq.load(out), ids), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), ids), want,
                          atol=1e-5, rtol=1e-5)


def test_runs_must_agree_and_cover_every_layer(tiny, tmp_path):
    r0, r1, r2 = tmp_path / "r0", tmp_path / "r1", tmp_path / "r2"
    write_run(r0, tiny["model"], layers=[0])
    write_run(r1, tiny["model"], layers=[0, 1])
    write_run(r2, tiny["model"], layers=[1], calib_sha="different")
    with pytest.raises(ArbqError, match="layers missing"):
        run_pack([r0], tmp_path / "o")
    with pytest.raises(ArbqError, match="layer 0 is present in both"):
        run_pack([r0, r1], tmp_path / "o")
    with pytest.raises(ArbqError, match="calibration"):
        run_pack([r0, r2], tmp_path / "o")
    r3 = tmp_path / "r3"
    write_run(r3, tiny["model"], layers=[1], method="billm", cgb=False)
    with pytest.raises(ArbqError, match="recipe"):
        run_pack([r0, r3], tmp_path / "o")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(ArbqError, match="refusing to overwrite"):
        run_pack([r1], tmp_path / "o")


@pytest.fixture
def packed_copy(tiny, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny["packed"], out)
    return out


def _rehash(path):
    from arbq.fileio import file_hashes

    man = json.loads((path / MANIFEST).read_text())
    man["files"] = file_hashes(path, list(man["files"]))
    (path / MANIFEST).write_text(json.dumps(man))


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    _rehash(path)


def test_refuses_flipped_byte(packed_copy):
    f = packed_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01                     # a data byte: safetensors alone would load it silently
    f.write_bytes(bytes(data))
    with pytest.raises(ArbqError, match="sha256 mismatch"):
        arbq.load(packed_copy)
    with pytest.raises(ArbqError, match="sha256 mismatch"):
        AutoModelForCausalLM.from_pretrained(packed_copy)


def test_refuses_truncated_shard(packed_copy):
    f = packed_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    with pytest.raises(ArbqError, match="sha256 mismatch"):
        arbq.load(packed_copy)
    _rehash(packed_copy)                   # even with a matching manifest, safetensors refuses it
    with pytest.raises(ArbqError, match="corrupt or truncated"):
        arbq.load(packed_copy)


def test_refuses_config_shape_disagreement(packed_copy):
    _edit_config(packed_copy, lambda c: c.update(intermediate_size=128))
    with pytest.raises(ArbqError, match="config says"):
        arbq.load(packed_copy)

    def salient(c):
        c["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["params"]["n_salient"] += 8
    _edit_config(packed_copy, lambda c: c.update(intermediate_size=96))
    _edit_config(packed_copy, salient)
    with pytest.raises(ArbqError, match="shape"):
        arbq.load(packed_copy)


def test_refuses_unknown_format_version(packed_copy):
    _edit_config(packed_copy, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(ArbqError, match="format_version 99"):
        arbq.load(packed_copy)
    with pytest.raises(ArbqError, match="format_version 99"):
        AutoModelForCausalLM.from_pretrained(packed_copy)


def test_refuses_missing_and_unexpected_keys(packed_copy):
    from safetensors.torch import load_file, save_file

    f = packed_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.self_attn.o_proj.sign1"]
    tensors["model.layers.1.extra"] = torch.zeros(3)
    save_file(tensors, str(f), metadata={"format": "pt"})
    _rehash(packed_copy)
    with pytest.raises(ArbqError, match="missing .*o_proj.sign1.*unexpected .*layers.1.extra"):
        arbq.load(packed_copy)
    with pytest.raises(ArbqError, match="missing"):
        AutoModelForCausalLM.from_pretrained(packed_copy)


def test_refuses_unlisted_weights(packed_copy):
    shutil.copy(packed_copy / "model.safetensors", packed_copy / "model-extra.safetensors")
    with pytest.raises(ArbqError, match="not covered by the manifest"):
        arbq.load(packed_copy)


def test_generate_from_packed_dir(tiny):
    text = run_generate(str(tiny["packed"]), "Once upon a time", max_new_tokens=4)
    assert text.startswith("Once upon a time") and len(text) > len("Once upon a time")


def _python(code: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]


def test_import_arbq_is_light_and_registers_in_either_order():
    _python("import sys, arbq; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    _python("import arbq\nfrom transformers.quantizers import auto\nassert 'arbq' in auto.AUTO_QUANTIZER_MAPPING")
    _python("from transformers.quantizers import auto\nimport arbq\nassert 'arbq' in auto.AUTO_QUANTIZER_MAPPING")


def test_refuses_bitmap_disagreeing_with_config(packed_copy):
    from safetensors.torch import load_file, save_file

    f = packed_copy / "model.safetensors"
    tensors = load_file(str(f))
    key = "model.layers.0.mlp.gate_proj.salient"
    bitmap = tensors[key].clone()
    bitmap[0] ^= 0x01                      # one more or one fewer salient column than n_salient says
    tensors[key] = bitmap
    save_file(tensors, str(f), metadata={"format": "pt"})
    _rehash(packed_copy)
    with pytest.raises(ArbqError, match="salient bitmap marks"):
        arbq.load(packed_copy)


def test_tied_embeddings_round_trip(tmp_path):
    model_dir = save_tiny(tmp_path / "tied", tie_word_embeddings=True)
    results = write_run(tmp_path / "run", model_dir, method="billm", cgb=False, blocksize=32)
    out = tmp_path / "packed"
    run_pack([tmp_path / "run"], out, dtype="fp32", scale_dtype="fp32")
    ids = torch.randint(0, 1000, (1, 6))
    want = _logits(_fake_quant(model_dir, results), ids)
    for model in (arbq.load(out), AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)):
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.allclose(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
