"""RUN/model-fake: a plain HF dir whose binarized linears hold the dequantized weights Ŵ."""

from __future__ import annotations

import os
import shutil

import torch

from arbq.models import arch as archmod
from arbq.models.loading import ModelRef, load_model, load_tokenizer
from arbq.stages.run_dir import RunDir


@torch.no_grad()
def write_fake_model(ref: ModelRef, run: RunDir, spec: archmod.ArchSpec) -> None:
    """Load the original model, overwrite every binarized linear with Ŵ, save atomically."""
    model, _ = load_model(ref)
    for i, layer in enumerate(archmod.decoder_layers(model, spec)):
        lin = archmod.layer_linears(layer, spec)
        for name, res in run.read_layer(i, list(spec.linears)).items():
            lin[name].weight.copy_(res.dequantize().to(lin[name].weight.dtype))
    tmp = run.fake_dir.with_name(run.fake_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True
    model.save_pretrained(str(tmp))
    load_tokenizer(ref).save_pretrained(str(tmp))
    os.replace(tmp, run.fake_dir)
