"""Atomic file writes, hashing, JSON manifests and output-dir locks.

Every file arbq writes goes to `.<name>.tmp-<pid>` first, is fsynced and renamed into place (and the
directory fsynced), so an interrupted run never leaves a half-written file under the final name; the
next run in that dir removes scratch left by a killed one. Every OS or serialisation error on write
(full disk, permissions, read-only filesystem, a file where a dir should be) is one ArbqError naming
the path. `output_lock` gives one process at a time a dir to write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from arbq import dtypes
from arbq.errors import ArbqError

LOCK_NAME = ".arbq.lock"
_SCRATCH = re.compile(r"(?:^\.activations-|\.tmp-)(\d+)(?:-|$)")


def write_error(path: str | os.PathLike, e: BaseException) -> ArbqError:
    """One-line ArbqError for an OS or safetensors error while writing `path`."""
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return ArbqError(f"no space left on device while writing {path}")
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
        return ArbqError(f"cannot write {path}: {e.strerror or e}{where}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "No space left" in first or "os error 28" in first:
        return ArbqError(f"no space left on device while writing {path}")
    return ArbqError(f"cannot write {path}: {first}")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn OSError / SafetensorError raised inside the block into a one-line ArbqError naming `path`
    (for writers arbq does not own, such as transformers' `save_pretrained`)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise write_error(path, e) from None


def make_dirs(path: str | os.PathLike) -> Path:
    """mkdir -p `path`; a file in the way, EACCES or EROFS is a one-line ArbqError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ArbqError(f"cannot write {path}: a file of that name exists (expected a directory)") from None
    except OSError as e:
        raise write_error(path, e) from None
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's data (or a directory's entries) so a rename after it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):   # some filesystems cannot fsync dirs
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (a directory about to be renamed into place)."""
    root = Path(root)
    for p in sorted(root.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        fsync_path(p)
    fsync_path(root)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it, rename it onto `path` and fsync the
    dir, else delete it. OS and safetensors errors become one-line ArbqErrors naming `path`."""
    path = Path(path)
    make_dirs(path.parent)
    if path.is_dir():
        raise ArbqError(f"cannot write {path}: it is a directory")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except (OSError, SafetensorError) as e:
        raise write_error(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_scratch(root: str | os.PathLike, prefix: str = "", depth: int = 2) -> list[Path]:
    """Delete scratch under `root` (at most `depth` dirs down: RUN/calib/stats) left by killed runs:
    `*.tmp-<pid>` files and dirs and `.activations-<pid>-*` dirs whose process is gone. `prefix`
    limits it to names in `root` itself starting so. Returns what was removed."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        if len(Path(dirpath).relative_to(root).parts) >= depth:
            dirnames.clear()
        for name in list(dirnames) + filenames:
            m = _SCRATCH.search(name)
            if not m or not name.startswith(prefix) or _pid_alive(int(m.group(1))):
                continue
            p = Path(dirpath) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                if name in dirnames:
                    dirnames.remove(name)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
        if Path(dirpath) == root and prefix:
            dirnames.clear()
    return removed


def _lock_owner(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, beside: bool = False) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on the output dir `out` for the whole block, then remove
    the stale scratch of killed runs in it.

    The lock is `out/.arbq.lock` (`beside=True`: `<parent>/.<name>.arbq.lock`, for an output that is
    replaced as a whole, such as a packed dir). A second writer (e.g. a requeued Slurm task while the
    first still runs) is refused with one line instead of mixing its files with the first's. The lock is
    an flock: it dies with its process, so a killed run never blocks the next one."""
    out = Path(out)
    lock = out.parent / f".{out.name}.arbq.lock" if beside else out / LOCK_NAME
    make_dirs(lock.parent)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise write_error(lock, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArbqError(f"{out} is being written by another arbq process{_lock_owner(fd)}; wait for it "
                            f"to finish or choose another -o") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise write_error(lock, e) from None
            # a filesystem without flock (some cluster mounts): write unlocked rather than not at all
            print(f"arbq: warning: cannot lock {lock} ({e.strerror}); make sure no other process writes {out}",
                  file=sys.stderr)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_scratch(out.parent, prefix=f".{out.name}.") if beside else remove_stale_scratch(out)
        yield out
    finally:
        os.close(fd)


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


SAFETENSORS_DTYPES = dtypes.SAFETENSORS


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
