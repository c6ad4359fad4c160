"""The packed layouts (layouts.py: "binary" in format.py + codec.py, "uniform" in uniform.py, "binary_nm" in
nm.py), their runtime module (binary_linear.py), the loader (loader.py) and the transformers quantizer."""

from arbq.packed.format import FORMAT_VERSION, LinearSpec, Scheme

__all__ = ["FORMAT_VERSION", "LinearSpec", "Scheme", "load", "is_packed", "BinaryLinear"]


def __getattr__(name: str):
    if name in ("load", "is_packed"):
        from arbq.packed import loader

        return getattr(loader, name)
    if name == "BinaryLinear":
        from arbq.packed.binary_linear import BinaryLinear

        return BinaryLinear
    raise AttributeError(f"module 'arbq.packed' has no attribute {name!r}")
