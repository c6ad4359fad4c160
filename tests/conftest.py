"""Shared test fixtures: tiny random models built in-process, and the real cached fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from arbq import fixtures

if not torch.cuda.is_available():  # Triton kernels (if installed) run on CPU tensors through its interpreter;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported


def tiny_config(model_type: str = "llama", **kw):
    """A tiny config of a supported architecture (random init; seconds to build)."""
    from transformers import AutoConfig

    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)
    if model_type == "opt":
        base = dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=49152,
                    max_position_embeddings=512, word_embed_proj_dim=64)
    if model_type in ("gemma3_text", "gemma3"):   # one sliding-window (16 tokens) and one full-attention layer
        base.update(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    base.update(kw)
    if model_type == "gemma3":                    # multimodal: the language model + a tiny SigLIP tower
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return AutoConfig.for_model(model_type, text_config=base, vision_config=vision, mm_tokens_per_image=4)
    return AutoConfig.for_model(model_type, **base)


def _require(path):
    """The fixture path; skip when absent in a bare `pytest` run, fail under CI and under `make test` /
    `make test-fast` (ARBQ_REQUIRE_FIXTURES=1), which fetch it first, so nothing is skipped silently."""
    if not path.exists():
        msg = f"fixture missing: {path} (run `make fixtures`)"
        if os.environ.get("CI") or os.environ.get("ARBQ_REQUIRE_FIXTURES"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def real_model_dir():
    return _require(fixtures.model_dir() / "config.json").parent


@pytest.fixture(scope="session")
def botchan():
    return _require(fixtures.botchan_path())


def save_tiny(path, model_type: str = "llama", seed: int = 0, **kw):
    """Build a tiny random model of `model_type`, save it with the fixture tokenizer, return the dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(_require(fixtures.model_dir() / "config.json").parent).save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after): in-process runs then sum in the same order as
    subprocesses started with OMP_NUM_THREADS=1, so their results can be compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def arbq_cli(monkeypatch, capsys):
    """arbq_cli(*args) → SimpleNamespace(returncode, stdout, stderr) of `arbq ARGS` run through
    `arbq.cli.main` in this process: no interpreter and torch start per call (seconds each), and faults
    monkeypatched by the test apply. Signal handlers are restored afterwards."""
    import signal
    import sys
    from types import SimpleNamespace

    from arbq import cli

    def run(*args) -> SimpleNamespace:
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        monkeypatch.setattr(sys, "argv", ["arbq", *map(str, args)])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A saved tiny random Llama (2 layers, hidden 64) with the fixture's tokenizer."""
    return save_tiny(tmp_path / "tiny-llama")


# the longest tiny-model files (measured), started first so that two xdist workers end together
LONG_FILES = ("test_scaling.py", "test_gemma3.py", "test_faults.py", "test_evaluate.py", "test_stages.py",
              "test_install.py", "test_nm_methods.py")


def pytest_collection_modifyitems(config, items):
    """Files with real-model (`fixture`) tests first, then the longest files, each file kept whole: under
    `make test`'s two xdist workers the long files start at once and the short ones fill in at the end."""
    slow = {item.path for item in items if item.get_closest_marker("fixture")}
    long = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: (item.path not in slow, long.get(item.path.name, len(long))))


@pytest.fixture(scope="module")
def ext():
    """The C++ CPU kernel extension (built on first use, ~1 min); skipped where no compiler is available."""
    import shutil

    from arbq.kernels import cpu

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    e = cpu.extension()
    if e is None:
        pytest.skip("C++ kernel failed to build")
    return e
