"""Run one `arbq` command in this process and record what it cost.

    python -m bench.measure --json COST.json -- binarize MODEL --recipe rc-cgb --calib CAL -o RUN

runs `arbq.cli.main()` with the arguments after `--`, then writes (atomically) and prints as the
last stdout line a JSON object:

    {"argv": [...], "rc": exit status, "wall_s": seconds, "peak_rss_mb": this process's peak RSS
     (the whole interpreter: Python, torch and the stage; VmHWM of /proc/self/status — ru_maxrss would
     carry over the parent's peak across fork + exec), "peak_gpu_mb": torch.cuda peak allocated or
     null, "user_s", "sys_s": CPU seconds}

The exit status of the arbq command is passed on.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _gpu_peak_mb() -> float | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20


def _peak_rss_mb(ru) -> float:
    """VmHWM (Linux: this process image's own high-water mark), else ru_maxrss (KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            line = next(v for v in f if v.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration, ValueError):
        return ru.ru_maxrss / 1024


def measure(arbq_args: list[str]) -> dict:
    """Run `arbq ARGS` in-process; returns the cost record (see the module docstring)."""
    from arbq.cli import main

    argv, sys.argv = sys.argv, ["arbq", *arbq_args]
    t0 = time.perf_counter()
    rc = 0
    try:
        main()
    except SystemExit as e:  # typer and arbq.cli.main always end with sys.exit
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"argv": ["arbq", *arbq_args], "rc": rc, "wall_s": round(wall, 3),
            "peak_rss_mb": round(_peak_rss_mb(ru), 1),
            "peak_gpu_mb": _gpu_peak_mb(), "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m bench.measure [--json PATH] -- ARBQ_ARGS...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    opts, arbq_args = argv[:cut], argv[cut + 1:]
    out = opts[opts.index("--json") + 1] if "--json" in opts else None
    rec = measure(arbq_args)
    if out:
        from arbq.fileio import write_json

        write_json(out, rec)
    print(json.dumps(rec), flush=True)
    return rec["rc"]


if __name__ == "__main__":
    sys.exit(main())
