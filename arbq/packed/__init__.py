"""The packed 1-bit format (format.py, codec.py), its runtime module (binary_linear.py), the loader
(loader.py) and the transformers quantizer registration (hf_quantizer.py)."""

from arbq.packed.format import FORMAT_VERSION, LinearSpec, Scheme, scheme_for

__all__ = ["FORMAT_VERSION", "LinearSpec", "Scheme", "scheme_for", "load", "is_packed", "BinaryLinear"]


def __getattr__(name: str):
    if name in ("load", "is_packed"):
        from arbq.packed import loader

        return getattr(loader, name)
    if name == "BinaryLinear":
        from arbq.packed.binary_linear import BinaryLinear

        return BinaryLinear
    raise AttributeError(f"module 'arbq.packed' has no attribute {name!r}")
