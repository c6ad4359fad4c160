"""`arbq pack`: real packed safetensors from one or more RUN dirs, plus everything needed to load them.

Every quantized linear is packed in the layout of its method's record (arbq.methods.registry ->
arbq.packed.layouts) with the recipe settings of that module (`BinarizeConfig.for_module`), and listed in
`quantization_config.modules[name] = {"layout", "method", "params"}` (format version 2).

PACKED/model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json above
MAX_SHARD_BYTES), config.json with the `quantization_config` block, tokenizer and generation files,
arbq_manifest.json (sha256 of every file). Layout of the packed tensors: arbq.packed.format.
Everything is written into a temporary directory beside PACKED and renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from arbq import dtypes
from arbq.errors import ArbqError
from arbq.fileio import (
    atomic_path,
    file_hashes,
    fsync_path,
    fsync_tree,
    library_versions,
    output_lock,
    write_json,
    writing,
)
from arbq.methods.config import BinarizeConfig
from arbq.methods.registry import get_method
from arbq.models.arch import decoder_layers
from arbq.models.loading import load_model, load_tokenizer, resolve
from arbq.models.moe import unfuse_experts
from arbq.packed.format import BIT_ORDER, FORMAT_VERSION, QUANT_METHOD, scale_dtype_of
from arbq.packed.layouts import layout_of, lookup_form
from arbq.packed.loader import MANIFEST, MANIFEST_FORMAT, expected_tensors
from arbq.packed.sizes import SizeReport, report_table
from arbq.stages.run_dir import RunDir

console = Console(stderr=True)
DTYPES = {k: dtypes.BY_NAME[k] for k in dtypes.HF_NAMES}   # --dtype of the unquantized tensors
MAX_SHARD_BYTES = 2 * 1024**3
SAME_ACROSS_RUNS = ("model", "model_type", "num_layers", "linears", "recipe")


def plan_runs(runs: list[Path]) -> tuple[dict, dict[int, RunDir]]:
    """(run info, layer -> RunDir holding it); every layer exactly once, one recipe and calibration."""
    if not runs:
        raise ArbqError("no run directories given")
    dirs = [RunDir(Path(r)) for r in runs]
    infos = [d.info() for d in dirs]
    base = infos[0]
    for d, info in zip(dirs[1:], infos[1:], strict=True):
        for key in SAME_ACROSS_RUNS:
            if info.get(key) != base.get(key):
                raise ArbqError(f"{d.root} and {dirs[0].root} differ in {key!r}: they cannot be packed together")
        if info.get("calib", {}).get("manifest_sha256") != base.get("calib", {}).get("manifest_sha256"):
            raise ArbqError(f"{d.root} and {dirs[0].root} used different calibration data (manifest sha256)")
    owner: dict[int, RunDir] = {}
    for d in dirs:
        for i in d.present_layers(base["num_layers"]):
            if i in owner:
                raise ArbqError(f"layer {i} is present in both {owner[i].root} and {d.root}")
            owner[i] = d
    missing = [i for i in range(base["num_layers"]) if i not in owner]
    if missing:
        raise ArbqError(f"layers missing from the runs: {missing[:20]}{'...' if len(missing) > 20 else ''} "
                        "(finish them with `arbq binarize --resume` or pass the other run dirs)")
    return base, owner


class ShardWriter:
    """Streams tensors into safetensors shards of at most max_bytes (one file if everything fits)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[dict[str, torch.Tensor] | list[str]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.size + nbytes > self.max_bytes:
            self._flush()
        self.pending.update(tensors)
        self.size += nbytes

    def _flush(self) -> None:
        i = len(self.shards)
        with atomic_path(self.root / f"shard-{i}.tmp") as tmp:  # "format": "pt" is what transformers expects
            save_file({k: v.detach().contiguous().cpu() for k, v in self.pending.items()}, str(tmp),
                      metadata={"format": "pt", "arbq_format_version": str(FORMAT_VERSION)})
        self.shards.append(list(self.pending))
        self.pending, self.size = {}, 0

    def close(self) -> list[str]:
        """Final file names; writes model.safetensors.index.json when there is more than one shard."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.root / "shard-0.tmp", self.root / "model.safetensors")
            return ["model.safetensors"]
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        total = 0
        for i, name in enumerate(names):
            os.replace(self.root / f"shard-{i}.tmp", self.root / name)
            total += (self.root / name).stat().st_size
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: names[i] for i, keys in enumerate(self.shards) for k in keys}}
        write_json(self.root / "model.safetensors.index.json", index)
        return [*names, "model.safetensors.index.json"]


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())):
        raise ArbqError(f"{out} exists and is not a packed model directory; refusing to overwrite it")


def quantization_config(modules: dict[str, dict]) -> dict:
    """config.json's quantization_config (format version 2) for the packed modules {name: {layout, method,
    params}}."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bit_order": BIT_ORDER,
            "modules": modules}


def write_manifest(tmp: Path, source: dict, rep: dict) -> None:
    """`tmp`'s sha256 manifest of every file written so far, with where it came from and the size report's
    binarized and model figures."""
    names = [p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith(".")]
    write_json(tmp / MANIFEST, {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION,
                                "files": file_hashes(tmp, names), "source": source,
                                "versions": library_versions(), "size": {k: rep[k] for k in ("binarized", "model")}})


def replace_dir(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def run_pack(runs: list[Path], out: Path, *args, **kwargs) -> dict:
    """`_run_pack` holding the lock beside `out` (`<parent>/.<name>.arbq.lock`; the packed dir is replaced as a
    whole): a second packer of the same output is refused, and a killed pack's `.<name>.tmp-<pid>` dir is
    removed."""
    with output_lock(Path(out), beside=True):
        return _run_pack(runs, out, *args, **kwargs)


def _run_pack(runs: list[Path], out: Path, dtype: str = "fp16", scale_dtype: str | None = None,
             json_out: Path | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, interleave: bool = False) -> dict:
    """Pack the runs into `out`; returns (and prints, and optionally writes) the size report.
    scale_dtype None = the recipe's (the dtype the fit rounded its scales to; runs older than that
    option: fp16). interleave: linears whose scheme the CPU lookup kernel runs are written in its own layout
    (arbq.packed.layouts.lookup_form: binary -> binary_lut, the same bits; binary_nm -> binary_nm_lut)."""
    if dtype not in DTYPES:
        raise ArbqError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if scale_dtype is not None:
        scale_dtype_of(scale_dtype)
    out = Path(out)
    _check_out(out)
    info, owner = plan_runs([Path(r) for r in runs])
    recipe = BinarizeConfig.from_dict(info["recipe"])
    ref = resolve(info["model"])
    model, spec = load_model(ref, dtype=DTYPES[dtype])
    if model.config.model_type != info["model_type"]:
        raise ArbqError(f"run was made for a {info['model_type']} model but {ref} is {model.config.model_type}")
    blocks = decoder_layers(model, spec)
    if len(blocks) != info["num_layers"]:
        raise ArbqError(f"run has {info['num_layers']} layers but {ref} has {len(blocks)}")
    if spec.moe is not None:     # fused experts → one linear per expert projection, packed (and loaded) as such
        unfuse_experts(blocks, spec.moe)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer, sizes, modules, done = ShardWriter(tmp, max_shard_bytes), SizeReport(), {}, set()
        for i in range(info["num_layers"]):
            results = owner[i].read_layer(i, info["linears"])
            methods = owner[i].layer_methods(i, info["linears"])
            for name, res in results.items():
                full, lin = f"{spec.layers}.{i}.{name}", blocks[i].get_submodule(name)
                cfg = recipe.for_module(full)
                if cfg is None:
                    raise ArbqError(f"{full}: the run holds a result for it but its recipe ignores it")
                if tuple(res.shape) != tuple(lin.weight.shape):
                    raise ArbqError(f"{full}: result {tuple(res.shape)} does not match the model's "
                                    f"{tuple(lin.weight.shape)}")
                rec = get_method(methods[name])
                if rec.name != cfg.method:
                    raise ArbqError(f"{full}: the run holds a {rec.name} result but its recipe says {cfg.method}")
                p = layout_of(rec.layout).pack(res, rec.layout_params(cfg), scale_dtype or cfg.scale_dtype, full)
                if interleave:
                    p = lookup_form(p, full)
                tensors = dict(p.tensors)
                if lin.bias is not None:
                    tensors["bias"] = lin.bias.detach().to(DTYPES[dtype])
                sizes.add(full, p.spec, tensors, method=cfg.label())
                writer.add({f"{full}.{k}": v for k, v in tensors.items()})
                modules[full] = {"layout": p.spec.layout, "method": cfg.label(), "params": p.spec.to_params()}
                done |= {f"{full}.weight", f"{full}.bias"}
        params = 0
        for key, t in expected_tensors(model).items():
            params += t.numel()
            if key not in done:
                writer.add({key: t.detach().to(DTYPES[dtype])})
        files = writer.close()

        cfg = model.config.to_dict()
        cfg.update(quantization_config=quantization_config(modules), dtype=dtypes.HF_NAMES[dtype],
                   use_cache=True)
        write_json(tmp / "config.json", cfg)
        with writing(tmp):
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            load_tokenizer(ref).save_pretrained(tmp)
        packed_bytes = sum((tmp / f).stat().st_size for f in files if f.endswith(".safetensors"))
        rep = sizes.to_dict(params, packed_bytes, format_version=FORMAT_VERSION, method=recipe.label(),
                            cgb=recipe.cgb, blocksize=recipe.blocksize, scale_dtype=scale_dtype or recipe.scale_dtype,
                            dtype=dtype)
        write_manifest(tmp, {"model": info["model"], "runs": [str(r) for r in runs],
                             "calib_manifest_sha256": info.get("calib", {}).get("manifest_sha256")}, rep)
        fsync_tree(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    console.print(report_table(rep))
    console.print(f"packed → {out}")
    if json_out:
        write_json(json_out, rep)
    return rep

