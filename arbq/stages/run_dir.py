"""Layout of a binarization run directory (RUN), shared by `binarize` (writer) and `pack` (reader).

RUN/run.json                     what was run: model ref, model_type, layers, linears, recipe, calib hash
RUN/layers/layer_0007.safetensors  results of decoder layer 7: each linear's result tensors (the result
                                 type of its method's record, e.g. LinearResult) under "<linear>.<field>"
                                 (e.g. "self_attn.q_proj.sign1"); metadata "arbq" = JSON {"layer": 7,
                                 "report": [per-linear report rows], "methods": {linear: method}}; linears
                                 a recipe ignores are absent. Files without "methods" (older runs) hold
                                 every linear, made with run.json's recipe method
RUN/layers/layer_0007.sha256     the layer file's sha256, written after it; checked whenever the layer is
                                 read (a layer file with "methods" but no hash file counts as unfinished)
RUN/report.jsonl                 one row per binarized linear (rebuilt from the layer files)
RUN/model-fake/                  HF dir whose linears hold the dequantized binarized weights
RUN/calib/                       calibration written by `binarize` when no --calib was given
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbq.errors import ArbqError
from arbq.fileio import load_tensors, read_info, read_json, save_tensors, sha256_file, write_text
from arbq.methods.registry import get_method

RUN_FORMAT = "arbq-run/1"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def layers_dir(self) -> Path:
        return self.root / "layers"

    def layer_path(self, i: int) -> Path:
        return self.layers_dir / f"layer_{i:04d}.safetensors"

    @property
    def report(self) -> Path:
        return self.root / "report.jsonl"

    @property
    def fake_dir(self) -> Path:
        return self.root / "model-fake"

    def info(self) -> dict[str, Any]:
        info = read_json(self.run_json)
        if info.get("format") != RUN_FORMAT:
            raise ArbqError(f"{self.root}: unknown run format {info.get('format')!r} (expected {RUN_FORMAT})")
        return info

    def hash_path(self, i: int) -> Path:
        return self.layers_dir / f"layer_{i:04d}.sha256"

    def layer_complete(self, i: int) -> bool:
        """A layer file counts only if it opens, its header names the layer (writes are atomic) and, for files
        that record their methods (every file this version writes), its hash file was written after it."""
        info = read_info(self.layer_path(i)) or {}
        return info.get("layer") == i and ("methods" not in info or self.hash_path(i).is_file())

    def present_layers(self, num_layers: int) -> list[int]:
        return [i for i in range(num_layers) if self.layer_complete(i)]

    def write_layer(self, i: int, results: dict[str, Any], report: list[dict], methods: dict[str, str]) -> None:
        """results: linear -> its method's result; methods: linear -> method name."""
        tensors = {}
        for name, res in results.items():
            tensors.update(res.to_tensors(name))
        save_tensors(self.layer_path(i), tensors, info={"layer": i, "report": report, "methods": methods})
        write_text(self.hash_path(i), sha256_file(self.layer_path(i)) + "\n")

    def verify_layer(self, i: int) -> None:
        """Refuse a layer file whose sha256 differs from the one recorded when it was written."""
        if self.hash_path(i).is_file():
            want = self.hash_path(i).read_text().strip()
            if sha256_file(self.layer_path(i)) != want:
                raise ArbqError(f"{self.layer_path(i)}: sha256 differs from {self.hash_path(i).name}: the file is "
                                "corrupt or was modified; delete both and rerun `arbq binarize --resume`")

    def layer_methods(self, i: int, linears: list[str]) -> dict[str, str]:
        """linear -> method of the results stored for layer i, for the `linears` asked that it holds (older
        files hold every linear, made with run.json's method)."""
        methods = (read_info(self.layer_path(i)) or {}).get("methods")
        if methods is None:
            return dict.fromkeys(linears, self.info()["recipe"]["method"])
        if not isinstance(methods, dict) or not all(isinstance(m, str) for m in methods.values()):
            raise ArbqError(f"{self.layer_path(i)}: malformed 'methods' in its header")
        return {name: methods[name] for name in linears if name in methods}

    def read_layer(self, i: int, linears: list[str]) -> dict[str, Any]:
        """linear -> result (its method's result type) of every linear stored for layer i."""
        self.verify_layer(i)
        tensors = load_tensors(self.layer_path(i))
        return {name: get_method(m).result_type.from_tensors(tensors, name)
                for name, m in self.layer_methods(i, linears).items()}

    def layer_report(self, i: int) -> list[dict]:
        return (read_info(self.layer_path(i)) or {}).get("report", [])

    def rebuild_report(self, num_layers: int) -> list[dict]:
        rows = [row for i in self.present_layers(num_layers) for row in self.layer_report(i)]
        write_text(self.report, "".join(json.dumps(r) + "\n" for r in rows))
        return rows
