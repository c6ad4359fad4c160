"""`--method` name → MethodRecord (arbq.methods.record): fit, packed layout, result type, recipe keys.

`BinarizeConfig.method` is looked up here (a dict, no if-chains). A new method is one file that
defines its record(s) plus one import line below; its layout (arbq.packed.layouts) and, optionally,
kernels (arbq.kernels) are found through the record.
"""

from __future__ import annotations

from arbq.errors import ArbqError
from arbq.methods import binary, nm, uniform_gptq
from arbq.methods.record import MethodRecord
from arbq.packed.format import Scheme

METHODS: dict[str, MethodRecord] = {r.name: r for r in [*binary.RECORDS, uniform_gptq.RECORD, *nm.RECORDS]}


def get_method(name: str) -> MethodRecord:
    try:
        return METHODS[name]
    except KeyError:
        raise ArbqError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def scheme_for(method: str, cgb: bool) -> Scheme:
    """The binary packed scheme of a binary-family method (tests, benches): its record's layout params."""
    from arbq.methods.config import BinarizeConfig

    rec = get_method(method)
    if rec.layout != "binary":
        raise ArbqError(f"cannot pack method {method!r} in the binary layout (it writes {rec.layout!r})")
    params = rec.layout_params(BinarizeConfig(method=method, cgb=cgb))
    return Scheme.from_params(params)
