"""Load a packed model directory (written by `arbq pack`) as a transformers model running from the bits.

PACKED/config.json            model config + `quantization_config`: quant_method "arbq", format_version 2,
                              bit_order, modules: name -> {"layout", "method", "params"} (arbq.packed.layouts);
                              version 1 (one method/cgb/blocksize/scale_dtype for the whole model, modules:
                              name -> shapes) is read too and converted to version 2 entries
PACKED/model*.safetensors     packed linears (arbq.packed.format) and the unbinarized weights
PACKED/arbq_manifest.json     sha256 of every other file

`load` verifies the manifest, builds the model skeleton with parameters on the meta device (fused MoE
experts replaced by per-expert linears: arbq.models.moe.unfuse_experts), swaps every
packed linear for a BinaryLinear, checks the checkpoint's keys, shapes and dtypes against it, then
assigns the tensors (safetensors only: nothing is unpickled). On the CPU each packed linear is then held in
the layout its kernel reads in place (adopt_resident_forms), the stored planes released.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from arbq import dtypes
from arbq.errors import ArbqError
from arbq.fileio import read_json, verify_hashes
from arbq.models.arch import unfuse_moe
from arbq.models.lazy import params_on_meta
from arbq.packed.binary_linear import BinaryLinear
from arbq.packed.format import FORMAT_VERSION, QUANT_METHOD, SCALE_DTYPES, param
from arbq.packed.layouts import spec_from_entry, validate

MANIFEST = "arbq_manifest.json"
MANIFEST_FORMAT = "arbq-packed"


def is_packed(path: str | Path) -> bool:
    """True if `path` is a directory whose config.json declares quant_method "arbq" (no hashing): such a dir
    is read by `load` only, which refuses it if its manifest or anything else is wrong."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def quant_config(config) -> dict:
    """The validated `quantization_config` dict of a config (object or dict), as format version 2."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    return check_quant_config(q.to_dict() if hasattr(q, "to_dict") else q)


# format version 1 wrote one method for the whole model; these are the binary schemes it could name
V1_SCHEMES: dict[str, dict[str, bool]] = {
    "sign": dict(rc=False, salient=False, group=False), "billm": dict(rc=False, salient=True, group=True),
    "arb": dict(rc=False, salient=True, group=True), "x": dict(rc=False, salient=True, group=True),
    "rc": dict(rc=True, salient=True, group=True),
}


def _v1_modules(q: dict) -> dict[str, dict]:
    """Version-1 fields -> version-2 module entries (the tensors are the same)."""
    where = "quantization_config (format version 1)"
    method = param(q, "method", str, where, lambda v: v in V1_SCHEMES, f"one of {', '.join(V1_SCHEMES)}")
    cgb = param(q, "cgb", bool, where)
    blocksize = param(q, "blocksize", int, where, lambda v: v > 0)
    sd = param(q, "scale_dtype", str, where, lambda v: v in SCALE_DTYPES)
    flags = V1_SCHEMES[method]
    mods = param(q, "modules", dict, where)
    out = {}
    for name, m in mods.items():
        if not isinstance(m, dict):
            raise ArbqError(f"{where}: module {name} must be a mapping")
        out[name] = {"layout": "binary", "method": method + ("+cgb" if cgb and flags["salient"] else ""),
                     "params": {**{k: m.get(k) for k in ("out_features", "in_features", "n_salient")},
                                "blocksize": blocksize, **flags, "cgb": cgb and flags["salient"], "scale_dtype": sd}}
    return out


def check_quant_config(q: dict | None) -> dict:
    """Refuse a quantization_config that is not arbq's, of a format version this code cannot read, or with a
    malformed value (one line naming it); returns it as format version 2 with every module entry checked."""
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise ArbqError("not an arbq packed model: config.json has no quantization_config with quant_method 'arbq'")
    version = q.get("format_version")
    if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
        raise ArbqError(f"unsupported arbq format_version {version!r} (this arbq reads 1 and "
                        f"{FORMAT_VERSION}); upgrade arbq or re-pack the model")
    if q.get("bit_order", "little") != "little":
        raise ArbqError(f"unsupported bit_order {q.get('bit_order')!r}")
    modules = _v1_modules(q) if version == 1 else param(q, "modules", dict, "quantization_config")
    for name, entry in modules.items():
        spec_from_entry(entry, name)
        if not isinstance(entry.get("method", ""), str):
            raise ArbqError(f"quantization_config: module {name}: method must be a string")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bit_order": "little",
            "modules": modules, "read_from_format_version": version}


def verify_manifest(root: str | Path) -> dict:
    """Check every file listed in PACKED/arbq_manifest.json against its sha256; unlisted weights are an error."""
    root = Path(root)
    man = read_json(root / MANIFEST)
    if man.get("format") != MANIFEST_FORMAT or not isinstance(man.get("files"), dict):
        raise ArbqError(f"{root / MANIFEST}: not an arbq manifest")
    unlisted = [p.name for p in root.iterdir() if p.suffix == ".safetensors" and p.name not in man["files"]]
    if unlisted or "config.json" not in man["files"]:
        raise ArbqError(f"{root}: files not covered by the manifest: {', '.join(unlisted or ['config.json'])}")
    verify_hashes(root, man["files"])
    return man


def linear_specs(q: dict) -> dict:
    """name -> layout spec of every packed module of a (checked) version-2 quantization_config."""
    return {name: spec_from_entry(entry, name) for name, entry in q["modules"].items()}


def swap_linears(model: nn.Module, q: dict, device: str | torch.device = "meta",
                 dtype: torch.dtype = torch.float32) -> None:
    """Replace every nn.Linear named in q["modules"] by an empty BinaryLinear of the recorded layout and shape."""
    for name, spec in linear_specs(q).items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ArbqError(f"packed module {name} does not exist in this architecture") from None
        if not isinstance(old, nn.Linear):
            raise ArbqError(f"packed module {name} is a {type(old).__name__}, not nn.Linear")
        if (old.out_features, old.in_features) != (spec.out_features, spec.in_features):
            raise ArbqError(f"{name}: config says {old.out_features}x{old.in_features} but the packed weight is "
                            f"{spec.out_features}x{spec.in_features}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                BinaryLinear(spec, bias=old.bias is not None, device=device, dtype=dtype))


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent state of the model, each shared (tied) tensor under its first name only.

    Tied targets (e.g. lm_head.weight with tie_word_embeddings) are left out whether or not they are
    tied yet: transformers builds its skeleton untied and ties after loading.
    """
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    out, seen = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key not in tied and id(t) not in seen:
            seen.add(id(t))
            out[key] = t
    return out


def check_checkpoint(model: nn.Module, header: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Refuse missing or unexpected keys, shape mismatches, and packed tensors of the wrong dtype."""
    want = expected_tensors(model)
    missing, unexpected = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing or unexpected:
        raise ArbqError(f"checkpoint does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
                        f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    packed = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, BinaryLinear)
              for b in m.spec.tensor_shapes()}
    for key, t in want.items():
        shape, dt = header[key]
        if tuple(shape) != tuple(t.shape):
            raise ArbqError(f"{key}: checkpoint shape {tuple(shape)} disagrees with the config's {tuple(t.shape)}")
        if key in packed and dt != t.dtype:
            raise ArbqError(f"{key}: checkpoint dtype {dt} disagrees with the packed format's {t.dtype}")


def adopt_resident_forms(model: nn.Module, modules: dict) -> list[str]:
    """Every packed linear on the CPU in the layout its kernel reads in place (arbq.kernels.resident_form: the
    CPU lookup holds "binary" as binary_lut, with the same bits, and an RC "binary_nm" as binary_nm_lut), so the
    process keeps one copy of each layer instead of the stored planes plus the kernel's load-time copy. The
    modules' quantization_config entries are updated to the layout held; returns the names of those changed."""
    from arbq import kernels

    changed = []
    for name, mod in model.named_modules():
        if not isinstance(mod, BinaryLinear):
            continue
        p = mod.packed()
        q = kernels.resident_form(p, "cpu", name) if p.device.type == "cpu" else p
        if q is not p:
            mod.adopt(q, restore_off_cpu=True)
            modules[name] = {**modules[name], "layout": q.spec.layout, "params": q.spec.to_params()}
            changed.append(name)
    return changed


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing). A conversion's large
    temporaries are freed into the allocator's arenas, which otherwise keep them resident: loading a 4096-class
    model kept ≈ 200 MB more than the model holds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def own_copies(model: nn.Module) -> None:
    """Copy every parameter and buffer that may be a view of a mapped weights file into memory of its own, so
    no mapping (and none of the file pages a conversion read through it) stays resident; tied tensors stay tied."""
    seen: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for name, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is None:
                continue
            if isinstance(t, nn.Parameter):
                if id(t) not in seen:
                    seen[id(t)] = t
                    t.data = t.data.clone()
            elif id(t) not in seen:
                seen[id(t)] = mod._buffers[name] = t.clone()
            else:
                mod._buffers[name] = seen[id(t)]


_dtype_of = dtypes.from_safetensors


def weight_files(root: Path) -> list[Path]:
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ArbqError(f"{root}: no .safetensors files")
    return files


def read_header(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of every tensor in the files, from the safetensors headers only."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    sl = h.get_slice(key)
                    if key in out:
                        raise ArbqError(f"tensor {key} appears in more than one shard")
                    out[key] = (tuple(sl.get_shape()), _dtype_of(sl.get_dtype()))
        except (SafetensorError, OSError) as e:
            raise ArbqError(f"corrupt or truncated safetensors file {f}: {e}") from None
    return out


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
         verify: bool = True, resident: bool = True) -> nn.Module:
    """A packed model as an eval-mode transformers causal LM whose packed linears are BinaryLinear.

    dtype: dtype of the unbinarized weights and activations (None keeps the stored one).
    verify: check the sha256 manifest first (a flipped byte loads silently otherwise).
    resident: on the CPU, hold each packed linear in the layout its kernel reads in place (adopt_resident_forms:
    "binary" as binary_lut, the same bits; model.config.quantization_config then names the layout held);
    False keeps the stored layouts (and the kernel builds its own copy where it needs one). A layer held so goes
    back to its stored layout, which the GPU kernels read, when the model is moved off the CPU (BinaryLinear.adopt's
    restore_off_cpu); device="cuda" loads it there as stored.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    if not (root / "config.json").is_file():
        raise ArbqError(f"{root} is not a packed model directory (no config.json)")
    if verify:
        verify_manifest(root)
    config = AutoConfig.from_pretrained(root)
    q = quant_config(config)
    del config.quantization_config  # the skeleton is built plain; BinaryLinear is swapped in below
    files = weight_files(root)
    header = read_header(files)
    stored = next((dt for (_, dt) in header.values() if dt.is_floating_point and dt != torch.float8_e4m3fn), None)
    dtype = dtype or stored or torch.float32
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse_moe(model, device="meta")     # MoE: per-expert linears, as pack stored them
    swap_linears(model, q, device="meta", dtype=dtype)
    check_checkpoint(model, header)
    packed = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, BinaryLinear)
              for b in m.spec.tensor_shapes()}
    # Tensors kept as stored are views of the file's mapping (no copy). When some are converted to `dtype`,
    # the others are copied too, so no view keeps the mapping (and the source pages the conversion read)
    # resident next to the converted copies: the process then holds what the model holds.
    convert = any(dt.is_floating_point and dt != dtype for key, (_, dt) in header.items() if key not in packed)
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    t = h.get_tensor(key)
                    if key not in packed and t.is_floating_point() and t.dtype != dtype:
                        state[key] = t.to(dtype)
                    else:
                        state[key] = t.clone() if convert else t
        except (SafetensorError, OSError) as e:
            raise ArbqError(f"corrupt or truncated safetensors file {f}: {e}") from None
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ArbqError(f"tensors not loaded: {left[:5]}")
    del state
    for name, mod in model.named_modules():
        if isinstance(mod, BinaryLinear):
            validate(mod.packed(), name)
    if resident and torch.device(device).type == "cpu" and adopt_resident_forms(model, q["modules"]):
        if not convert:
            own_copies(model)      # the other tensors are views of the files: let the mappings (and read pages) go
        release_freed_memory()
    model.config.quantization_config = q
    if (root / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(root)
    model.eval()
    return model.to(device)
