"""Atomic file writes, hashing and JSON manifests.

Every file arbq writes goes to `<name>.tmp-<pid>` first and is renamed into place, so an
interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from arbq.errors import ArbqError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ArbqError(f"no space left on device while writing {path}") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArbqError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArbqError(f"corrupt JSON in {path}: {e}") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], info: dict | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically (no pickle anywhere).

    `info` is stored as one sorted-JSON metadata entry "arbq" (safetensors does not keep the order
    of several metadata keys, and a file's bytes must not depend on it)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"arbq": json.dumps(info, sort_keys=True)} if info is not None else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header dict, offset where tensor data starts) of a safetensors file, without mapping it."""
    try:
        with open(path, "rb") as f:
            size = f.read(8)
            n = struct.unpack("<Q", size)[0] if len(size) == 8 else -1
            raw = f.read(n) if 0 < n < 1 << 30 else b""
        header = json.loads(raw) if raw and len(raw) == n else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ArbqError(f"corrupt or truncated safetensors file {path}")
    return header, 8 + n


def copy_tensors(src: str | os.PathLike, dst: str | os.PathLike,
                 replace: Callable[[str, torch.dtype], torch.Tensor | None], chunk: int = 1 << 24) -> None:
    """Copy the safetensors file `src` to `dst` atomically, one tensor at a time: where
    `replace(key, stored dtype)` returns a tensor (same dtype and shape) it is written instead, every
    other tensor is copied as raw bytes in chunks; the metadata gains "format": "pt" (transformers wants it).
    Only one tensor (or chunk) is in memory at a time, and `src` is not memory-mapped."""
    header, start = read_header(src)
    header["__metadata__"] = {**header.get("__metadata__", {}), "format": "pt"}
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_path(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        fout.write(struct.pack("<Q", len(head)) + head)
        for key, e in entries:
            begin, end = e["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(e["dtype"])
            t = replace(key, dtype) if dtype is not None else None
            if t is not None:
                if list(t.shape) != list(e["shape"]) or t.dtype != dtype:
                    raise ArbqError(f"{key}: replacement {tuple(t.shape)} {t.dtype} does not match {src}")
                fout.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                continue
            fin.seek(start + begin)
            left = end - begin
            while left > 0:
                block = fin.read(min(chunk, left))
                if not block:
                    raise ArbqError(f"corrupt or truncated safetensors file {src}")
                fout.write(block)
                left -= len(block)


def read_info(path: str | os.PathLike) -> dict | None:
    """The "arbq" metadata of a safetensors file, or None if the file is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("arbq", "null"))
    except (SafetensorError, OSError, json.JSONDecodeError):
        return None


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file raises ArbqError."""
    path = Path(path)
    if not path.is_file():
        raise ArbqError(f"missing file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArbqError(f"corrupt or truncated safetensors file {path}: {e}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: str | os.PathLike, names: list[str]) -> dict[str, str]:
    root = Path(root)
    return {n: sha256_file(root / n) for n in sorted(names)}


def verify_hashes(root: str | os.PathLike, hashes: dict[str, str]) -> None:
    """Raise ArbqError naming the first file whose sha256 differs from the manifest."""
    root = Path(root)
    for name, want in hashes.items():
        p = root / name
        if not p.is_file():
            raise ArbqError(f"missing file listed in manifest: {p}")
        if sha256_file(p) != want:
            raise ArbqError(f"sha256 mismatch for {p}: the file is corrupt or was modified")


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    import arbq

    return {"arbq": arbq.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}
