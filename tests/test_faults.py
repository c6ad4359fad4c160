"""Fault injection (issue 16): every bad input or broken environment ends in one line `error: …` and exit 2,
or resumes to the same bits; nothing hangs and nothing half-written is left under a final name.

Tiny random models; CLI runs in-process through `arbq.cli.main` (so faults can be monkeypatched in) except
where a second process or a signal is the point. `pytest -m faults` runs just these.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import save_tiny

pytestmark = pytest.mark.faults

CAL = ["--nsamples", "2", "--seqlen", "32", "--seed", "0"]


@pytest.fixture
def run_cli(arbq_cli):
    """run_cli(*args) → (exit code, stderr) of `arbq ARGS` in this process (conftest.arbq_cli)."""
    def run(*args) -> tuple[int, str]:
        res = arbq_cli(*args)
        return res.returncode, res.stderr
    return run


def subprocess_cli(*args, timeout=300, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "arbq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def one_line_error(code: int, err: str, needle: str) -> str:
    """The run exited 2 with exactly one `error:` line containing `needle` (case-insensitive), no traceback."""
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle.lower() in lines[0].lower(), err
    return lines[0]


def no_scratch(root: Path) -> None:
    left = [p for p in root.rglob("*") if re.search(r"\.tmp-\d+|\.activations-", p.name)]
    assert not left, left


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def calib(tmp_path_factory, tiny, botchan):
    """A finished calibration with statistics of the tiny model."""
    out = tmp_path_factory.mktemp("faults-cal") / "cal"
    from arbq.stages.calibrate import run_calibrate

    run_calibrate(str(tiny), out, data=str(botchan), nsamples=2, seqlen=32, seed=0)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- loading: missing / unexpected weights, a quantization_config arbq cannot read --------------------------


def _edit_checkpoint(model: Path, dst: Path, drop: str | None = None, add: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    _copy(model, dst)
    t = load_file(dst / "model.safetensors")
    if drop:
        t.pop(drop)
    if add:
        t[add] = t["model.norm.weight"].clone()
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("verbosity", ["error", "warning"])
def test_missing_tensor_is_refused(tmp_path, tiny, botchan, run_cli, monkeypatch, verbosity):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", verbosity)      # "error" hid transformers' only warning
    bad = _edit_checkpoint(tiny, tmp_path / "m", drop="model.layers.1.mlp.up_proj.weight")
    one_line_error(*run_cli("generate", bad, "hi", "--max-new-tokens", "1"), "missing weights: "
                   "model.layers.1.mlp.up_proj.weight")
    one_line_error(*run_cli("eval", bad, "--ppl", botchan, "--seqlen", "32", "--max-windows", "1"), "missing")
    # the lazy reader finds the gap and falls back to the full load, which must refuse too
    one_line_error(*run_cli("calibrate", bad, "-o", tmp_path / "c", "--data", botchan, *CAL), "missing weights")


def test_unexpected_tensor_is_refused(tmp_path, tiny, run_cli):
    bad = _edit_checkpoint(tiny, tmp_path / "m", add="model.layers.9.extra.weight")
    one_line_error(*run_cli("generate", bad, "hi", "--max-new-tokens", "1"), "unexpected weights")


def test_renamed_quant_method_is_refused(tmp_path, tiny, run_cli):
    bad = _copy(tiny, tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "arbqq", "format_version": 1}
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "arbq_manifest.json").write_text("{}")
    one_line_error(*run_cli("generate", bad, "hi", "--max-new-tokens", "1"), "'arbqq'")
    one_line_error(*run_cli("eval", bad, "--ppl", tmp_path / "none.txt", "--seqlen", "32"), "'arbqq'")


# ---- calibration files: hashes verified on read, resume checks what determines the result ------------------


def _flip_last_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_flipped_bit_in_statistics(tmp_path, tiny, calib, botchan, run_cli):
    cal = _copy(calib, tmp_path / "cal")
    _flip_last_bit(cal / "stats" / "layer_0001.safetensors")
    one_line_error(*run_cli("binarize", tiny, "-o", tmp_path / "r", "--method", "sign", "--no-sequential",
                            "--calib", cal), "sha256 mismatch")
    one_line_error(*run_cli("calibrate", tiny, "-o", cal, "--data", botchan, *CAL, "--resume"), "sha256 mismatch")
    assert json.loads((cal / "manifest.json").read_text()) == json.loads((calib / "manifest.json").read_text())


def test_resume_of_a_finished_calibration_only_verifies(tmp_path, tiny, calib, botchan, run_cli):
    cal = _copy(calib, tmp_path / "cal")
    before = (cal / "manifest.json").read_bytes()
    code, err = run_cli("calibrate", tiny, "-o", cal, "--data", botchan, *CAL, "--resume")
    assert code == 0, err
    assert (cal / "manifest.json").read_bytes() == before          # nothing re-hashed or rewritten


def test_flipped_bit_in_samples_and_wrong_shape(tmp_path, tiny, calib, run_cli):
    cal = _copy(calib, tmp_path / "cal")
    _flip_last_bit(cal / "samples.safetensors")
    one_line_error(*run_cli("binarize", tiny, "-o", tmp_path / "r", "--method", "sign", "--calib", cal),
                   "sha256 mismatch")
    cal2 = _copy(calib, tmp_path / "cal2")
    manifest = json.loads((cal2 / "manifest.json").read_text())
    manifest["params"]["nsamples"] = 3
    (cal2 / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(*run_cli("binarize", tiny, "-o", tmp_path / "r2", "--method", "sign", "--calib", cal2),
                   "nsamples")


def test_resume_refuses_changed_calibration_in_run_dir(tmp_path, tiny, botchan, run_cli):
    args = ["binarize", tiny, "-o", tmp_path / "r", "--method", "sign", "--data", botchan, *CAL[:4]]
    code, err = run_cli(*args, "--seed", "0")
    assert code == 0, err
    one_line_error(*run_cli(*args, "--seed", "1", "--resume"), "different settings")
    one_line_error(*run_cli(*args, "--seed", "0", "--resume", "--nsamples", "3"), "different settings")
    other = save_tiny(tmp_path / "other", seed=1)                     # another model at another path
    one_line_error(*run_cli("binarize", other, *args[2:], "--seed", "0", "--resume"), "model")
    code, err = run_cli(*args, "--seed", "0", "--resume")
    assert code == 0, err


def test_resume_refuses_a_model_replaced_in_place(tmp_path, botchan, run_cli):
    model = save_tiny(tmp_path / "m")
    args = ["calibrate", model, "-o", tmp_path / "c", "--data", botchan, *CAL]
    assert run_cli(*args)[0] == 0
    shutil.rmtree(model)
    save_tiny(model, intermediate_size=128)                          # same path, other weights
    one_line_error(*run_cli(*args, "--resume"), "weight sizes differs")


def test_model_path_is_recorded_resolved(tmp_path, tiny, botchan, run_cli, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    code, err = run_cli("calibrate", tiny.name, "-o", tmp_path / "c", "--data", botchan, *CAL, "--no-stats")
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["params"]["model"] == str(tiny.resolve())


# ---- writes: a full disk on every kind of file, a file where a dir should be ------------------------------


class _FullFile:
    """A file whose first write stores half its bytes and then fails with ENOSPC."""

    def __init__(self, f, name):
        self._f, self._name = f, name

    def write(self, b):
        self._f.write(b[: len(b) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)

    def __getattr__(self, k):
        return getattr(self._f, k)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def full_disk(monkeypatch, pattern: str) -> None:
    """Writes to files whose path matches the regex `pattern` fail with ENOSPC: Python writes at the first
    write (after storing half), native writes (safetensors) at the fsync before the rename."""
    real_open, real_fsync = builtins.open, os.fsync

    def fake_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if any(c in mode for c in "wax+") and re.search(pattern, str(file)):
            return _FullFile(f, str(file))
        return f

    def fake_fsync(fd):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if re.search(pattern, name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "fsync", fake_fsync)


@pytest.mark.parametrize("final", ["samples.safetensors", "stats/layer_0001.safetensors", "manifest.json"])
def test_full_disk_during_calibrate(tmp_path, tiny, botchan, run_cli, monkeypatch, final):
    name = Path(final)
    full_disk(monkeypatch, re.escape(f"{name.parent}/.{name.name}.tmp-".lstrip("./")))
    out = tmp_path / "c"
    one_line_error(*run_cli("calibrate", tiny, "-o", out, "--data", botchan, *CAL), "no space left")
    assert not (out / final).exists()                 # nothing half-written under the final name
    no_scratch(out)


@pytest.mark.parametrize("pattern", [r"/\.run\.json\.tmp", r"layers/\.layer_0001\.safetensors\.tmp",
                                     r"/\.report\.jsonl\.tmp", r"model-fake\.tmp-\d+/\.?model\.safetensors",
                                     r"model-fake\.tmp-\d+/tokenizer", r"model-fake\.tmp-\d+/config\.json",
                                     r"\.activations-\d+-"])
def test_full_disk_during_binarize(tmp_path, tiny, calib, run_cli, monkeypatch, pattern):
    full_disk(monkeypatch, pattern)
    out = tmp_path / "r"
    one_line_error(*run_cli("binarize", tiny, "-o", out, "--method", "sign", "--calib", calib,
                            "--offload-activations", "disk"), "no space left")
    assert not (out / "model-fake").exists()
    if "layer_0001" in pattern:
        assert not (out / "layers" / "layer_0001.safetensors").exists()
    no_scratch(out)


def test_full_disk_during_pack(tmp_path, tiny, calib, run_cli, monkeypatch):
    code, err = run_cli("binarize", tiny, "-o", tmp_path / "r", "--method", "sign", "--calib", calib)
    assert code == 0, err
    for pattern in (r"\.shard-\d+", r"\.?config\.json", r"tokenizer", r"arbq_manifest"):
        with monkeypatch.context() as m:
            full_disk(m, r"\.packed\.tmp-\d+/.*" + pattern)
            one_line_error(*run_cli("pack", tmp_path / "r", "-o", tmp_path / "packed"), "no space left")
        assert not (tmp_path / "packed").exists()
        no_scratch(tmp_path)


def test_full_disk_writing_eval_json(tmp_path, tiny, botchan, run_cli, monkeypatch):
    full_disk(monkeypatch, r"/\.eval\.json\.tmp-")
    one_line_error(*run_cli("eval", tiny, "--ppl", botchan, "--seqlen", "32", "--max-windows", "1", "--json",
                            tmp_path / "eval.json"), "no space left")
    assert not (tmp_path / "eval.json").exists()
    no_scratch(tmp_path)


def test_output_is_an_existing_file_or_read_only(tmp_path, tiny, botchan, run_cli):
    f = tmp_path / "afile"
    f.write_text("keep me")
    one_line_error(*run_cli("calibrate", tiny, "-o", f, "--data", botchan, *CAL), str(f))
    one_line_error(*run_cli("binarize", tiny, "-o", f / "sub", "--method", "sign", "--data", botchan, *CAL[:4]),
                   "cannot write")
    assert f.read_text() == "keep me"
    if os.geteuid() != 0:                            # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        one_line_error(*run_cli("calibrate", tiny, "-o", ro / "c", "--data", botchan, *CAL), "cannot write")


# ---- two writers, signals, stale scratch ----------------------------------------------------------------


def test_second_writer_is_refused(tmp_path, tiny, calib, botchan, run_cli):
    from arbq.fileio import output_lock

    with output_lock(tmp_path / "c"):
        res = subprocess_cli("calibrate", tiny, "-o", tmp_path / "c", "--data", botchan, *CAL, "--no-stats")
        one_line_error(res.returncode, res.stderr, "being written by another arbq process")
    with output_lock(tmp_path / "r"):
        one_line_error(*run_cli("binarize", tiny, "-o", tmp_path / "r", "--method", "sign", "--calib", calib),
                       f"pid {os.getpid()}")
    code, err = run_cli("binarize", tiny, "-o", tmp_path / "r", "--method", "sign", "--calib", calib)
    assert code == 0, err                                          # the lock died with its holder
    with output_lock(tmp_path / "packed", beside=True):
        one_line_error(*run_cli("pack", tmp_path / "r", "-o", tmp_path / "packed"), "being written by another")


def _layer_files(run: Path) -> dict[str, bytes]:
    """Layer files' tensors and report rows without the timings (the only field that may differ)."""
    from safetensors.torch import load_file

    from arbq.fileio import read_info

    out = {}
    for p in sorted((run / "layers").glob("layer_*.safetensors")):
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in read_info(p)["report"]]
        out[p.name] = ({k: v.numpy().tobytes() for k, v in load_file(p).items()}, rows)
    return out


@pytest.fixture(scope="module")
def deep(tmp_path_factory, botchan):
    """A 4-layer tiny model and its uninterrupted binarization."""
    root = tmp_path_factory.mktemp("faults-deep")
    model = save_tiny(root / "m", num_hidden_layers=4)
    args = ["binarize", model, "--method", "rc", "--cgb", "--iters", "2", "--blocksize", "32", "--data", botchan,
            *CAL[:4], "--offload-activations", "disk"]
    res = subprocess_cli(*args, "-o", root / "ref")
    assert res.returncode == 0, res.stderr
    return args, _layer_files(root / "ref")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_mid_layer_then_resume_is_bit_identical(tmp_path, deep, run_cli, one_thread, sig):
    args, want = deep
    out = tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "arbq.cli", *map(str, args), "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list((out / "layers").glob("layer_*.safetensors")):
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert len(list((out / "layers").glob("layer_*.safetensors"))) < 4, "the run finished before it could be killed"
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert err.strip().splitlines()[-1] == "interrupted by SIGTERM (rerun with --resume to continue)"
        no_scratch(out)                                           # cleaned up on the way out
    else:
        stale = out / "layers" / ".layer_0003.safetensors.tmp-999999"   # as a kill mid-write leaves it
        stale.write_bytes(b"half")
    code, err = run_cli(*args, "-o", out, "--resume")
    assert code == 0, err
    no_scratch(out)                                               # stale scratch of the killed run removed
    assert _layer_files(out) == want


@pytest.mark.parametrize("wrapped", [ValueError("could not determine the shape of object type 'UntypedStorage'"),
                                     "corrupt"])
def test_a_signal_whose_exception_a_c_extension_replaced_still_exits_as_interrupted(monkeypatch, capsys, wrapped):
    """SIGTERM inside safetensors' get_tensor comes back as a ValueError (or, through read_tensors, as a "corrupt
    file" ArbqError): main() still exits 128 + 15 with the one-line interrupted message, no traceback."""
    from arbq import cli
    from arbq.errors import ArbqError

    def app():
        try:
            cli._on_signal(signal.SIGTERM, None)
        except cli.Interrupted:
            raise (ArbqError("corrupt or truncated safetensors file m.safetensors") if wrapped == "corrupt"
                   else wrapped) from None

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(cli, "SIGNALLED", [])
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "interrupted by SIGTERM (rerun with --resume to continue)"


def test_stale_scratch_is_removed_by_the_next_run(tmp_path):
    from arbq.fileio import output_lock

    out = tmp_path / "r"
    (out / "layers").mkdir(parents=True)
    dead = [out / ".run.json.tmp-999999", out / "layers" / ".layer_0000.safetensors.tmp-999998",
            out / ".activations-999997-abcd", out / "model-fake.tmp-999996"]
    for p in dead[:2]:
        p.write_bytes(b"x")
    for p in dead[2:]:
        p.mkdir()
    alive = out / f".run.json.tmp-{os.getpid()}"
    alive.write_bytes(b"mine")
    with output_lock(out):
        assert not any(p.exists() for p in dead) and alive.exists()


# ---- kernel build: a stale lock does not hang, a library without its hash is not loaded --------------------


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    from arbq.kernels import cpu, cpu_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("ARBQ_BUILD_TIMEOUT", "2")
    monkeypatch.setattr(cpu, "_ext", None)
    from torch.utils.cpp_extension import _get_build_directory

    build = Path(_get_build_directory(cpu_build.library_name(), False))
    return cpu, build


@pytest.mark.parametrize("age", [0, 3600])
def test_stale_kernel_build_lock_does_not_hang(fresh_build, capfd, age):
    cpu, build = fresh_build
    lock = build / "lock"
    lock.write_text("")
    os.utime(lock, (time.time() - age, time.time() - age))
    t0 = time.time()
    assert cpu.extension() is None                   # the torch backend is used instead
    assert time.time() - t0 < 60
    assert not lock.exists()
    warn = [ln for ln in capfd.readouterr().err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and "torch backend" in warn[0]


def test_kernel_library_not_matching_its_hash_is_not_loaded(fresh_build, capfd):
    cpu, build = fresh_build
    from arbq.kernels.cpu_build import library_name

    so = build / f"{library_name()}.so"
    so.write_bytes(b"not the library that was built")
    (build / f"{so.name}.sha256").write_text("0" * 64 + "\n")
    assert cpu.extension() is None                   # rebuilt (here: timed out), never imported
    assert not so.exists() or so.read_bytes() != b"not the library that was built"


# ---- recipes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, key", [("blocksize: abc", "blocksize"), ('cgb: "false"', "cgb"),
                                       ("blocksize: 0", "blocksize"), ("percdamp: -1", "percdamp"),
                                       ("polish: -1", "polish"), ("polish: 1.5", "polish")])
def test_bad_recipe_value(tmp_path, tiny, run_cli, line, key):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"method: rc\n{line}\n")
    code, err = run_cli("binarize", tiny, "-o", tmp_path / "r", "--recipe", recipe)
    one_line_error(code, err, key)


def test_flipped_bit_in_a_run_layer_file_is_refused_when_read(tmp_path, tiny, calib, run_cli):
    """Layer files' sha256 (layers/layer_NNNN.sha256) is checked whenever a layer is read: pack refuses."""
    code, err = run_cli("binarize", tiny, "-o", tmp_path / "r", "--method", "sign", "--calib", calib)
    assert code == 0, err
    layer = tmp_path / "r" / "layers" / "layer_0001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-5] ^= 0x10                                   # a data byte: the header still parses
    layer.write_bytes(bytes(data))
    one_line_error(*run_cli("pack", tmp_path / "r", "-o", tmp_path / "p"), "sha256 differs")
