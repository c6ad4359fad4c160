"""Regenerate the golden files (run from the repo root: `python tests/golden/make_golden.py`).

methods.json:  per (method, cgb) flavour, the sha256 of every packed tensor of (a) a random result and
               (b) a real binarization of a fixed synthetic W, H; plus that binarization's relative weight and
               output errors. Written by the format-version-1 code (commit 75690a4) before the plug-in
               refactor: later code must reproduce the hashes bit for bit and the errors to 1e-6.
v1_packed/:    a tiny packed model (rc+cgb, random bits) written by `arbq pack` format version 1, tokenizer
               files dropped, plus logits.safetensors: its logits on fixed token ids.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

FLAVOURS = [("sign", False), ("billm", False), ("arb", True), ("x", False), ("x", True), ("rc", False), ("rc", True)]


def synthetic_problem(n: int = 48, k: int = 256, samples: int = 512, seed: int = 0):
    """W [n, k] with heavy-tailed columns and H = 2/m XᵀX from correlated inputs X [m, k]."""
    g = torch.Generator().manual_seed(seed)
    col = torch.exp(torch.randn(k, generator=g) * 0.7)
    W = torch.randn(n, k, generator=g) * col[None, :] * 0.02
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    X = (torch.randn(samples, k, generator=g) * torch.exp(torch.randn(k, generator=g) * 0.5)) @ mix
    H = 2.0 / samples * X.T @ X
    return W, H


def tensor_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    out = {}
    for name, t in sorted(tensors.items()):
        t = t.contiguous()
        raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
        out[name] = hashlib.sha256(raw.numpy().tobytes() + str((t.dtype, tuple(t.shape))).encode()).hexdigest()
    return out


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...; "" where /proc/cpuinfo is missing): MKL runs other
    kernels on other vendors, so the fits' float sums, and with them the binarized bits, differ in the last place."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def main() -> None:
    from packing_utils import random_result

    from arbq.methods.config import BinarizeConfig
    from arbq.methods.gptq import binarize_linear
    from arbq.packed.codec import pack_linear
    from arbq.packed.format import scheme_for

    W, H = synthetic_problem()
    golden = {}
    for method, cgb in FLAVOURS:
        key = f"{method}{'+cgb' if cgb else ''}"
        res = random_result(40, 100, method, cgb, blocksize=32, seed=3)
        rnd = tensor_hashes(pack_linear(res, scheme_for(method, cgb), "fp16").tensors)
        cfg = BinarizeConfig(method=method, cgb=cgb, blocksize=64, compensation="diagonal").checked()
        fit, row = binarize_linear(W, H, cfg)
        real = tensor_hashes(pack_linear(fit, scheme_for(method, cgb), "fp16").tensors)
        golden[key] = {"random_packed": rnd, "binarized_packed": real, "weight_err": row["weight_err"],
                       "output_err": row.get("output_err")}
    golden["_meta"] = {"torch_threads": torch.get_num_threads(), "cpu_vendor": cpu_vendor(),
                       "note": "binarized hashes are bit-exact only at this thread count (sum order) on this CPU "
                               "vendor (MKL's kernels)"}
    (HERE / "methods.json").write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")

    from conftest import save_tiny
    from packing_utils import write_run

    import arbq
    from arbq.stages.pack import run_pack

    work = HERE / "_work"
    shutil.rmtree(work, ignore_errors=True)
    model_dir = save_tiny(work / "tiny", hidden_size=32, intermediate_size=48, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=256)
    write_run(work / "run", model_dir, method="rc", cgb=True, blocksize=16)
    out = HERE / "v1_packed"
    shutil.rmtree(out, ignore_errors=True)
    run_pack([work / "run"], out, dtype="fp16", scale_dtype="fp16")
    man = json.loads((out / "arbq_manifest.json").read_text())
    for f in list(man["files"]):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            (out / f).unlink()
            del man["files"][f]
    man["source"] = {"note": "tests/golden/make_golden.py, format version 1"}
    (out / "arbq_manifest.json").write_text(json.dumps(man, indent=2, sort_keys=True) + "\n")
    model = arbq.load(out)
    ids = torch.arange(0, 256, 17)[None, :]
    with torch.no_grad():
        logits = model(ids).logits
    from safetensors.torch import save_file
    save_file({"ids": ids, "logits": logits.contiguous()}, str(HERE / "v1_logits.safetensors"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
