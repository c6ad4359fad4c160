"""Where the numbers were measured: CPU, cores, memory, library versions, threads, GPU, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_gib() -> float | None:
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        return round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        return None


def machine() -> dict:
    """machine/...: CPU model (/proc/cpuinfo), cores, memory, torch version and threads, GPU if any."""
    import transformers

    flags = (_cpuinfo("flags") or "").split()
    gpu = None
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        gpu = {"name": torch.cuda.get_device_name(i), "count": torch.cuda.device_count(),
               "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
               "cuda": torch.version.cuda}
    return {"cpu_model": _cpuinfo("model name") or platform.processor(), "cpu_cores": os.cpu_count(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "avx512": any(f.startswith("avx512") for f in flags), "amx": "amx_tile" in flags,
            "memory_gib": _mem_gib(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "gpu": gpu,
            "loadavg_at_start": _loadavg()}


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def git_commit() -> dict:
    """{commit, dirty (modified or untracked files exist)}; nulls outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}
