"""Scaling past one machine's memory: lazy layer-wise loading, activations on disk, the Hessian dtype."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file
from test_stages import layer_results, one_line_error

from arbq.errors import ArbqError
from arbq.methods.config import BinarizeConfig
from arbq.models import layerwise
from arbq.models.activations import DiskActivations, TensorActivations, scratch
from arbq.models.arch import ARCHS
from arbq.models.checkpoint import checkpoint_files
from arbq.models.lazy import LazyModel, open_layerwise
from arbq.models.loading import ModelRef, load_model, resolve
from arbq.stages.binarize import run_binarize
from arbq.stages.calibrate import run_calibrate

CAL = dict(nsamples=3, seqlen=48, seed=0)


def save_variant(path: Path, variant: str) -> Path:
    """A tiny Llama: `tied` (lm_head = embeddings, one file), `sharded` (untied, several shards with an
    index) or `bf16` (stored in bfloat16)."""
    from transformers import AutoModelForCausalLM

    if variant == "tied":
        return save_tiny(path, tie_word_embeddings=True)
    save_tiny(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    if variant == "bf16":
        model.to(torch.bfloat16).save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size="4MB")
        assert (path / "model.safetensors.index.json").is_file()
    return path


def stats_bytes(cal: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cal / "stats").glob("layer_*"))}


def checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_lazy_layer_and_stem_equal_the_checkpoint(tmp_path):
    model_dir = save_variant(tmp_path / "m", "tied")
    net = open_layerwise(resolve(str(model_dir)))
    assert isinstance(net, LazyModel) and net.tied
    assert all(p.device.type == "meta" for p in net.model.parameters())
    ck = checkpoint(model_dir)
    layer = net.load_layer(1, "cpu")
    state = layer.state_dict()
    assert len(state) == 9 and all(torch.equal(t, ck[f"model.layers.1.{k}"]) for k, t in state.items())
    assert all(p.device.type == "meta" for p in net.layers[0].parameters())     # only layer 1 was read
    net.free_layer(1)
    assert all(p.device.type == "meta" for p in layer.parameters())
    net.load_stem("cpu")
    eager, _ = load_model(resolve(str(model_dir)))
    emb = net.model.model.embed_tokens.weight
    assert torch.equal(emb, ck["model.embed_tokens.weight"]) and net.model.lm_head.weight is emb
    assert torch.equal(net.model.model.norm.weight, ck["model.norm.weight"])
    assert torch.equal(net.model.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq)   # not in the file
    net.free_stem()
    assert all(p.device.type == "meta" for p in net.model.parameters())


def test_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path):
    model_dir = save_tiny(tmp_path / "m")
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ArbqError, match="checkpoint shape"):
        open_layerwise(resolve(str(model_dir))).load_layer(0, "cpu")


@pytest.mark.parametrize("variant", ["tied", "sharded", "bf16"])
def test_lazy_loading_is_bit_identical_to_eager(tmp_path, botchan, variant):
    model = str(save_variant(tmp_path / "m", variant))
    original = checkpoint(Path(model))
    for lazy in (True, False):
        manifest = run_calibrate(model, tmp_path / f"cal-{lazy}", data=str(botchan), lazy=lazy, **CAL)
        assert manifest["runtime"]["lazy"] is lazy
    assert stats_bytes(tmp_path / "cal-True") == stats_bytes(tmp_path / "cal-False")
    for cfg in (BinarizeConfig(method="rc", cgb=True, iters=2, blocksize=32),
                BinarizeConfig(method="billm", sequential=False, blocksize=32)):
        runs = {lazy: tmp_path / f"{cfg.method}-{lazy}" for lazy in (True, False)}
        for lazy, run in runs.items():
            run_binarize(model, run, cfg, calib=tmp_path / "cal-True", lazy=lazy)
        assert layer_results(runs[True]) == layer_results(runs[False])
    fake_lazy, fake_eager = (checkpoint(tmp_path / f"rc-{lazy}" / "model-fake") for lazy in (True, False))
    assert fake_lazy.keys() >= fake_eager.keys()
    assert all(torch.equal(fake_lazy[k], t) for k, t in fake_eager.items())
    if variant == "sharded":
        assert (tmp_path / "rc-True" / "model-fake" / "model.safetensors.index.json").is_file()
    after = checkpoint(Path(model))          # binarizing in place never writes through to the checkpoint
    assert after.keys() == original.keys() and all(torch.equal(after[k], t) for k, t in original.items())


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_architecture_loads_lazily(tmp_path, botchan, model_type):
    model = str(save_tiny(tmp_path / model_type, model_type=model_type))
    assert open_layerwise(resolve(model)).lazy
    for lazy in (True, False):
        run_calibrate(model, tmp_path / f"cal-{lazy}", data=str(botchan), lazy=lazy, **CAL)
    assert stats_bytes(tmp_path / "cal-True") == stats_bytes(tmp_path / "cal-False")


def test_other_formats_fall_back_to_a_full_load(tmp_path, botchan):
    assert checkpoint_files(ModelRef(str(tmp_path), "model.gguf")) is None
    st = save_tiny(tmp_path / "st")
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(load_file(st / "model.safetensors"), binary / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (binary / name).write_bytes((st / name).read_bytes())
    assert not list(binary.glob("*.safetensors")) and not open_layerwise(resolve(str(binary))).lazy
    run_calibrate(str(st), tmp_path / "cal-st", data=str(botchan), **CAL)
    run_calibrate(str(binary), tmp_path / "cal-bin", data=str(botchan), **CAL)
    assert stats_bytes(tmp_path / "cal-st") == stats_bytes(tmp_path / "cal-bin")


def test_disk_activations_round_trip(tmp_path):
    x = torch.randn(3, 5, 7)
    with scratch(tmp_path, "disk") as acts:
        store = acts.new(3)
        assert isinstance(store, DiskActivations) and store.path.parent.parent == tmp_path
        for i in (2, 0, 1):
            store.put(i, x[i])
        assert all(torch.equal(store.get(i), x[i]) for i in range(3))
        store.close()
        assert not store.path.exists()
    assert not list(tmp_path.iterdir())
    with pytest.raises(ArbqError, match="offload-activations"):
        with scratch(tmp_path, "ram"):
            pass


@pytest.mark.parametrize("true_sequential", [False, True])
def test_disk_offload_gives_identical_results(tmp_path, tiny_llama_dir, botchan, true_sequential):
    model = str(tiny_llama_dir)
    for where in ("cpu", "disk", "device"):
        run_calibrate(model, tmp_path / f"cal-{where}", data=str(botchan), offload=where, **CAL)
        cfg = BinarizeConfig(method="rc", cgb=True, iters=2, blocksize=32, true_sequential=true_sequential)
        run_binarize(model, tmp_path / f"run-{where}", cfg, calib=tmp_path / "cal-cpu", offload=where)
    for where in ("disk", "device"):
        assert stats_bytes(tmp_path / f"cal-{where}") == stats_bytes(tmp_path / "cal-cpu")
        assert layer_results(tmp_path / f"run-{where}") == layer_results(tmp_path / "run-cpu")
    assert not list(tmp_path.glob("*/.activations-*"))        # scratch files are removed
    info = json.loads((tmp_path / "run-disk" / "run.json").read_text())
    assert info["runtime"] == {"device": "cpu", "offload_activations": "disk", "lazy": True}


class _Layer(torch.nn.Module):
    """A decoder-layer stand-in: one linear, returns a tuple like transformers' layers."""

    def __init__(self, k: int):
        super().__init__()
        self.proj = torch.nn.Linear(k, k)

    def forward(self, x):
        return (self.proj(x),)


def test_float64_hessian_is_closer_to_a_float64_reference():
    torch.manual_seed(0)
    n, s, k = 512, 8, 32                                # many samples: one float32 addition per sample
    x = torch.randn(n, s, k) + 50 * torch.rand(k)     # large means: float32 sums lose digits
    ref = 2.0 / (n * s) * (x.double().reshape(-1, k).T @ x.double().reshape(-1, k))
    layer = _Layer(k)
    err = {}
    for name in ("float32", "float64"):
        h, _ = layerwise.accumulate_hessians(layer, {"proj": layer.proj}, TensorActivations(0, data=x), {},
                                             dtype=layerwise.hessian_dtype(name), keep=False)
        assert h["proj"].dtype == torch.float32
        err[name] = ((h["proj"].double() - ref).norm() / ref.norm()).item()
    assert err["float64"] < err["float32"] / 4, err
    with pytest.raises(ArbqError, match="hessian-dtype"):
        layerwise.hessian_dtype("float16")


def test_hessian_dtype_is_recorded_and_checked(tmp_path, tiny_llama_dir, botchan):
    model = str(tiny_llama_dir)
    m64 = run_calibrate(model, tmp_path / "cal64", data=str(botchan), hessian_dtype="float64", **CAL)
    m32 = run_calibrate(model, tmp_path / "cal32", data=str(botchan), **CAL)
    assert m64["params"]["hessian_dtype"] == "float64" and m32["params"]["hessian_dtype"] == "float32"
    h64, h32 = (load_file(tmp_path / c / "stats" / "layer_0001.safetensors") for c in ("cal64", "cal32"))
    assert all(torch.allclose(h64[k], h32[k], rtol=1e-4, atol=1e-4) for k in h32)
    cfg = BinarizeConfig(method="billm", sequential=False, blocksize=32)
    run_binarize(model, tmp_path / "r64", cfg, calib=tmp_path / "cal64")
    assert json.loads((tmp_path / "r64" / "run.json").read_text())["hessian_dtype"] == "float64"
    with pytest.raises(ArbqError, match="differs from the statistics"):
        run_binarize(model, tmp_path / "r32", cfg, calib=tmp_path / "cal64", hessian_dtype="float32")
    seq = BinarizeConfig(method="billm", blocksize=32)
    run_binarize(model, tmp_path / "s64", seq, calib=tmp_path / "cal32", hessian_dtype="float64")
    assert json.loads((tmp_path / "s64" / "run.json").read_text())["hessian_dtype"] == "float64"
    with pytest.raises(ArbqError, match="hessian_dtype differs"):
        run_binarize(model, tmp_path / "s64", seq, calib=tmp_path / "cal32", resume=True)


def test_cli_scaling_flags(tmp_path, tiny_llama_dir, botchan, arbq_cli):
    cli = arbq_cli                      # in-process: the same main(), without a torch start per call
    base = ["--data", botchan, "--nsamples", 2, "--seqlen", 32]
    one_line_error(cli("calibrate", tiny_llama_dir, "-o", tmp_path / "c", *base, "--offload-activations", "ram"),
                   "unknown --offload-activations 'ram'")
    one_line_error(cli("calibrate", tiny_llama_dir, "-o", tmp_path / "c", *base, "--hessian-dtype", "float16"),
                   "unknown --hessian-dtype 'float16'")
    one_line_error(cli("binarize", tiny_llama_dir, "-o", tmp_path / "r", *base, "--device", "tpu"), "bad --device")
    ok = cli("binarize", tiny_llama_dir, "-o", tmp_path / "r", *base, "--method", "sign", "--offload-activations",
             "disk", "--hessian-dtype", "float64", "--no-lazy")
    assert ok.returncode == 0, ok.stderr
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["hessian_dtype"] == "float64" and info["runtime"]["lazy"] is False


def test_lmeval_entry_point_loads_packed_dirs(tmp_path, tiny_llama_dir, monkeypatch):
    """`python -m arbq.lmeval` (what README runs under `accelerate launch`) = lm-eval's CLI that can read a
    packed dir, with the same accuracy as `arbq eval` on it (one CPU process here)."""
    from packing_utils import write_run

    from arbq.stages.evaluate import load_for_eval
    from arbq.stages.pack import run_pack
    from arbq.stages.zeroshot import run_tasks

    monkeypatch.setenv("ARBQ_KERNEL", "torch")
    write_run(tmp_path / "run", tiny_llama_dir, method="rc", cgb=True, blocksize=32)
    packed = tmp_path / "packed"
    run_pack([tmp_path / "run"], packed, dtype="fp32", scale_dtype="fp32")
    task = Path(__file__).resolve().parents[1] / "arbq" / "recipes" / "tasks" / "botchan_cloze.yaml"
    res = subprocess.run([sys.executable, "-m", "arbq.lmeval", "--model", "hf", "--model_args",
                          f"pretrained={packed},dtype=float32", "--tasks", "botchan_cloze", "--include_path",
                          str(task.parent), "--limit", "6", "--device", "cpu", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["botchan_cloze"]
    net, tok = load_for_eval(str(packed))
    want = {r["metric"]: r["value"] for r in run_tasks(net, tok, [str(task)], limit=6)}
    assert got["acc,none"] == pytest.approx(want["acc"]) and got["acc_norm,none"] == pytest.approx(want["acc_norm"])

