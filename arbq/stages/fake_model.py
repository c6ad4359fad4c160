"""RUN/model-fake: a plain HF dir whose quantized linears hold the dequantized weights Ŵ.

Eager: load the whole model, overwrite the linears, `save_pretrained`. Streamed (a lazily loaded
safetensors model): every checkpoint file is copied tensor by tensor under the same name (index file
too), binarized weights replaced by Ŵ in the stored dtype, so only one tensor is in memory at a time.
Both give the same tensors and config.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from arbq.fileio import copy_tensors, fsync_tree, writing
from arbq.models import arch as archmod
from arbq.models.checkpoint import INDEX, Fused
from arbq.models.lazy import LazyModel
from arbq.models.loading import ModelRef, load_model, load_tokenizer
from arbq.stages.run_dir import RunDir


@torch.no_grad()
def write_fake_model(ref: ModelRef, run: RunDir, spec: archmod.ArchSpec, net: LazyModel | None = None) -> None:
    """Write RUN/model-fake atomically; streamed from the checkpoint when `net` (lazy) is given."""
    tmp = run.fake_dir.with_name(run.fake_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if net is None or _checkpoint_keys(net) is None:
            _save_eager(ref, run, spec, tmp)
        else:
            _save_streamed(net, run, tmp)
        with writing(tmp):
            load_tokenizer(ref).save_pretrained(str(tmp))
        fsync_tree(tmp)
        old = run.fake_dir.with_name(run.fake_dir.name + f".old-{os.getpid()}")
        if run.fake_dir.exists():   # layers were redone: the new model-fake replaces the old one whole
            os.replace(run.fake_dir, old)
        os.replace(tmp, run.fake_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_eager(ref: ModelRef, run: RunDir, spec: archmod.ArchSpec, tmp: Path) -> None:
    model, _ = load_model(ref)
    for i, layer in enumerate(archmod.decoder_layers(model, spec)):
        lin = archmod.layer_linears(layer, spec)
        for name, res in run.read_layer(i, list(spec.linears)).items():
            lin[name].weight.copy_(res.dequantize().to(lin[name].weight.dtype))
    model.config.use_cache = True
    with writing(tmp):
        model.save_pretrained(str(tmp))


def _checkpoint_keys(net: LazyModel) -> dict[str, tuple[int, str]] | None:
    """Checkpoint key → (layer, linear) of every binarizable weight. An expert projection's is its own
    per-expert tensor, one source of the fused parameter (`checkpoint.Fused`: gate_up_proj's keys[e] = (gate, up),
    down_proj's keys[e] = (down,)); None when a fused parameter is stored fused (then written eagerly)."""
    spec = net.spec
    out = {}
    for i in range(len(net)):
        prefix = f"{spec.layers}.{i}"
        for name in spec.linears:
            if not archmod.is_expert(spec, name):
                out[net.keymap[f"{prefix}.{name}.weight"]] = (i, name)
                continue
            e, proj = name[len(spec.moe.experts) + 1:].split(".")
            src = net.keymap[f"{prefix}.{spec.moe.experts}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"]
            if not isinstance(src, Fused):
                return None
            out[src.keys[int(e)][1 if proj == "up_proj" else 0]] = (i, name)
    return out


def _save_streamed(net: LazyModel, run: RunDir, tmp: Path) -> None:
    spec = net.spec
    linears = list(spec.linears)
    binarized = _checkpoint_keys(net)
    cache: dict[int, dict] = {}

    def dequantized(i: int, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Ŵ of layer i's linear `name`, or None (copied as is) when the recipe left it in full precision."""
        if i not in cache:
            cache.clear()
            cache[i] = run.read_layer(i, linears)
        res = cache[i].get(name)
        return None if res is None else res.dequantize().to(dtype)

    root = next(iter(net.files.values())).parent
    tmp.mkdir(parents=True)
    for path in sorted(set(net.files.values())):
        copy_tensors(path, tmp / path.name,
                     lambda key, dtype: dequantized(*binarized[key], dtype) if key in binarized else None)
    if (root / INDEX).is_file():
        shutil.copyfile(root / INDEX, tmp / INDEX)
    config = copy.deepcopy(net.model.config)
    config.use_cache = True
    config.architectures = [type(net.model).__name__]
    with writing(tmp):
        config.save_pretrained(str(tmp))
    if (root / "generation_config.json").is_file():
        shutil.copyfile(root / "generation_config.json", tmp / "generation_config.json")
