"""Building and loading the CPU backend's C++ kernel (binary_gemv.cpp and the files it #includes).

Built with torch.utils.cpp_extension.load (-O3 -march=native, OpenMP) into TORCH_EXTENSIONS_DIR under a
name that includes a hash of the CPU's feature flags, so a cache shared between machines never runs
code compiled for another CPU. The build runs in a child process with a timeout (ARBQ_BUILD_TIMEOUT,
default 600 s): torch waits forever on the `lock` file of a build that was killed, so a lock older than
the timeout is removed first, and a build that still times out is abandoned (its lock removed). The
built library's sha256 is kept next to it (`<name>.so.sha256`) and checked before every load; a library
without a matching hash is rebuilt. If the build fails (no compiler, no ninja, timeout) the backend
reports itself unsupported with one warning line and BinaryLinear falls back to the torch backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("binary_gemv.cpp")


def _source_tag() -> str:
    """Hash of every kernel source: the build is redone when an #included file changes, too."""
    h = hashlib.sha256()
    for f in sorted(SOURCE.parent.glob("*.cpp")):
        h.update(f.read_bytes())
    return h.hexdigest()[:8]


def _cpu_tag() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def library_name() -> str:
    return f"arbq_binary_gemv_{_cpu_tag()}_{_source_tag()}"


def _build_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get("ARBQ_BUILD_TIMEOUT", "600")))
    except ValueError:
        return 600.0


# torch's JIT build of the kernel, run by `_build_with_timeout` in a child process that needs only torch
# (argv: name, source, verbose)
BUILD_SCRIPT = ("import sys; from torch.utils.cpp_extension import load; "
                "load(name=sys.argv[1], sources=[sys.argv[2]], extra_cflags=['-O3', '-march=native', '-fopenmp'], "
                "extra_ldflags=['-fopenmp'], verbose=sys.argv[3] == '1')")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _remove_stale_lock(lock: Path, older_than: float) -> None:
    """torch's build lock (a bare file, no owner pid) left by a build killed mid-way; any live build
    finishes within the timeout, so a lock older than that is stale."""
    try:
        if time.time() - lock.stat().st_mtime > older_than:
            lock.unlink()
    except FileNotFoundError:
        pass


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; ninja starts each compiler in a process group of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL the build child and everything it started (python, ninja, the compilers)."""
    for p in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, signal.SIGKILL)


def _build_with_timeout(name: str, build_dir: Path) -> None:
    """Build in a child process; raise RuntimeError (one line) on failure or after the timeout."""
    timeout = _build_timeout()
    lock = build_dir / "lock"
    _remove_stale_lock(lock, timeout)
    print("arbq: building the CPU kernel (once per machine, about a minute)...", file=sys.stderr)
    verbose = bool(os.environ.get("ARBQ_VERBOSE_BUILD"))
    cmd = [sys.executable, "-c", BUILD_SCRIPT, name, str(SOURCE), "1" if verbose else "0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=None if verbose else subprocess.DEVNULL,
                            stderr=None if verbose else subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except BaseException as e:
        _kill_tree(proc.pid)
        proc.wait()
        lock.unlink(missing_ok=True)           # ours (the child was killed) or one we waited on for too long
        if isinstance(e, subprocess.TimeoutExpired):
            raise RuntimeError(f"build timed out after {timeout:.0f} s (ARBQ_BUILD_TIMEOUT)") from None
        raise
    if proc.returncode != 0:
        lines = (err or b"").decode(errors="replace").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"build exited with {proc.returncode}")


def load_verified(name: str):
    """Build if needed, check the library against the sha256 kept next to it, import it."""
    from torch.utils.cpp_extension import _get_build_directory, _import_module_from_library

    build_dir = Path(_get_build_directory(name, False))
    so, digest = build_dir / f"{name}.so", build_dir / f"{name}.so.sha256"
    if so.is_file() and not (digest.is_file() and digest.read_text().strip() == _sha256(so)):
        for f in [so, digest, *build_dir.glob("*.o")]:      # unverified: rebuild it from source
            f.unlink(missing_ok=True)
    if not so.is_file():
        _build_with_timeout(name, build_dir)
        if not so.is_file():
            raise RuntimeError(f"the build left no {so.name}")
        tmp = digest.with_name(f".{digest.name}.tmp-{os.getpid()}")
        tmp.write_text(_sha256(so) + "\n")
        os.replace(tmp, digest)
    return _import_module_from_library(name, str(build_dir), True)
