"""A wheel built from this tree, installed into a new virtual environment, finds its shipped recipes and
task files: `arbq binarize --recipe rc-cgb` and `arbq eval --tasks botchan_cloze` run outside the repo.

The venv sees the machine's site-packages (torch, transformers, ... are not downloaded again) but arbq
itself must come from the wheel: the test checks where it is imported from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist",
          REPO], cwd=root)
    wheel = next((root / "dist").glob("arbq-*.whl"))
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root / "venv")
    py = root / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], cwd=root)
    return root, py


def test_wheel_ships_recipes_and_tasks(installed):
    root, py = installed
    where = _run([py, "-c", "import arbq, pathlib; p = pathlib.Path(arbq.__file__).parent; "
                            "print(p); print(sorted(x.name for x in (p / 'recipes').rglob('*') if x.is_file()))"],
                 cwd=root).stdout.splitlines()
    assert str(root / "venv") in where[0], f"arbq imported from {where[0]}, not the wheel"
    assert "rc-cgb.yaml" in where[1] and "botchan_cloze.yaml" in where[1] and "botchan_cloze.jsonl" in where[1]


def test_installed_arbq_binarizes_with_a_shipped_recipe_and_evaluates_a_shipped_task(installed, tiny_llama_dir,
                                                                                     botchan):
    root, py = installed
    arbq = [py, "-m", "arbq.cli"]
    _run([*arbq, "binarize", tiny_llama_dir, "--recipe", "rc-cgb", "--iters", 1, "--blocksize", 32,
          "--data", botchan, "--nsamples", 2, "--seqlen", 32, "-o", root / "run"], cwd=root)
    run = json.loads((root / "run" / "run.json").read_text())
    assert run["recipe"]["method"] == "rc" and run["recipe"]["cgb"] is True
    _run([*arbq, "eval", root / "run" / "model-fake", "--tasks", "botchan_cloze", "--limit", 2,
          "--json", root / "eval.json"], cwd=root)
    res = json.loads((root / "eval.json").read_text())
    assert res["perplexity"] == [] and {r["task"] for r in res["tasks"]} == {"botchan_cloze"}
