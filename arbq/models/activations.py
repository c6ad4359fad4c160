"""Hidden states of the n calibration samples between two decoder layers: n × [S, D] float32.

Where they live (`--offload-activations`):
- `device`: one [n, S, D] tensor on the compute device (fastest; needs the room there);
- `cpu`:    one [n, S, D] tensor in CPU memory (the default);
- `disk`:   a raw float32 file in a scratch directory, read and written one sample [S, D] at a time,
            so only one sample is in memory (for n·S·D too large for RAM).
A stage opens a `scratch(root, where, device)` and asks it for `new(n)` stores; each store is filled
with `put(i, x)` and read with `get(i)`, and `close()` frees it (deletes its file).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from arbq.errors import ArbqError
from arbq.fileio import make_dirs, write_error

OFFLOAD = ("device", "cpu", "disk")


def check_offload(where: str) -> str:
    """`where` if it is a known --offload-activations choice, else a one-line ArbqError."""
    if where not in OFFLOAD:
        raise ArbqError(f"unknown --offload-activations {where!r}; choose one of: {', '.join(OFFLOAD)}")
    return where


class Activations:
    """n samples of [S, D] float32; shape fixed by the first `put`."""

    def __init__(self, n: int):
        self.n = n
        self.shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return self.n

    def get(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def put(self, i: int, x: torch.Tensor) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorActivations(Activations):
    """One [n, S, D] float32 tensor on `device` (allocated at the first put)."""

    def __init__(self, n: int, device: str | torch.device = "cpu", data: torch.Tensor | None = None):
        super().__init__(n if data is None else data.shape[0])
        self.device = torch.device(device) if data is None else data.device
        self.data = None if data is None else data.float()
        self.shape = None if data is None else tuple(data.shape[1:])

    def get(self, i: int) -> torch.Tensor:
        return self.data[i]

    def put(self, i: int, x: torch.Tensor) -> None:
        if self.data is None:
            self.shape = tuple(x.shape)
            self.data = torch.empty(self.n, *x.shape, dtype=torch.float32, device=self.device)
        self.data[i] = x

    def close(self) -> None:
        self.data = None


class DiskActivations(Activations):
    """A raw float32 file [n, S, D] (C order); every get/put moves one sample [S, D] through CPU memory."""

    def __init__(self, n: int, path: Path):
        super().__init__(n)
        self.path = path
        try:
            self.file = open(path, "w+b")  # closed by close()
        except OSError as e:
            raise write_error(path, e) from None

    def _offset(self, i: int) -> int:
        return i * int(torch.Size(self.shape).numel()) * 4

    def get(self, i: int) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=torch.float32)
        self.file.seek(self._offset(i))
        view = memoryview(out.numpy()).cast("B")
        if self.file.readinto(view) != len(view):
            raise ArbqError(f"activation file {self.path} is truncated (sample {i})")
        return out

    def put(self, i: int, x: torch.Tensor) -> None:
        if self.shape is None:
            self.shape = tuple(x.shape)
        self.file.seek(self._offset(i))
        try:
            self.file.write(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        except OSError as e:
            raise write_error(self.path, e) from None

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)


class Scratch:
    """Makes activation stores of one kind; disk stores live in `root` (deleted with it)."""

    def __init__(self, where: str, device: str | torch.device, root: Path | None):
        self.where, self.device, self.root = where, device, root
        self._ids = itertools.count()

    def new(self, n: int) -> Activations:
        if self.where == "disk":
            return DiskActivations(n, self.root / f"acts-{next(self._ids)}.f32")
        return TensorActivations(n, self.device if self.where == "device" else "cpu")


@contextlib.contextmanager
def scratch(root: Path, where: str = "cpu", device: str | torch.device = "cpu") -> Iterator[Scratch]:
    """A Scratch for `--offload-activations where`; disk files go to a temporary dir under `root`,
    `.activations-<pid>-*`, removed at the end (or, after a kill, by the next run's
    `fileio.remove_stale_scratch`)."""
    if check_offload(where) != "disk":
        yield Scratch(where, device, None)
        return
    make_dirs(root)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".activations-{os.getpid()}-", dir=root))
    except OSError as e:
        raise write_error(root, e) from None
    try:
        yield Scratch(where, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
