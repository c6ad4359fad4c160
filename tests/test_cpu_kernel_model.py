"""A packed tiny model decoding through the C++ CPU kernels (table lookup at batch 1), not the torch backend.

test_pack_stage.py runs every model test on the torch backend (exact, build-free); this is the one that
runs a whole packed rc+cgb model on ARBQ_KERNEL=cpu and checks that the lookup kernel really ran.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import save_tiny
from packing_utils import write_run
from transformers import AutoModelForCausalLM

import arbq
from arbq.kernels import cpu
from arbq.packed.binary_linear import BinaryLinear
from arbq.stages.pack import run_pack


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if cpu.extension() is None:
        pytest.skip("C++ kernel failed to build")
    root = tmp_path_factory.mktemp("cpu-kernel")
    model_dir = save_tiny(root / "tiny")
    results = write_run(root / "run", model_dir, method="rc", cgb=True, blocksize=32)
    run_pack([root / "run"], root / "packed", dtype="fp32", scale_dtype="fp32")
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for (i, name), res in results.items():
        ref.model.layers[i].get_submodule(name).weight.data = res.dequantize()
    return root / "packed", ref


@pytest.mark.parametrize("tokens", [1, 5])
def test_decode_through_the_lookup_kernel_equals_fake_quant(packed, monkeypatch, tokens):
    monkeypatch.setenv("ARBQ_KERNEL", "cpu")
    monkeypatch.delenv("ARBQ_CPU_LANES", raising=False)          # the default: table lookup
    path, ref = packed
    model = arbq.load(path)
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    linears = [m for m in model.modules() if isinstance(m, BinaryLinear)]
    assert len(linears) == 14
    for m in linears:
        cache = m.kernel_cache()
        assert cache[("backend", "cpu", "cpu")] is cpu                # not the torch fallback
        assert "lut" in cache                                      # the lookup layout was built and used
