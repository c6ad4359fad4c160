"""arbq: binary (1-bit) post-training quantization of large language models.

Pipeline: calibrate → binarize → pack → eval (see `arbq.stages`). Algorithms live in
`arbq.methods`; the packed 1-bit format and its runtime module in `arbq.packed`.

`arbq.load(PACKED)` loads a packed model; after `import arbq`,
`transformers.AutoModelForCausalLM.from_pretrained(PACKED)` works too (quant_method "arbq" is
registered the moment transformers' quantizer registry is imported). `import arbq` itself stays light:
it imports neither torch nor transformers.
"""

from arbq._hf_hook import install as _install_hf_hook

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("load", "is_packed"):
        from arbq.packed import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'arbq' has no attribute {name!r}")


_install_hf_hook()
