"""Register arbq's transformers quantizer as soon as transformers' quantizer registry exists.

`import arbq` must stay light, so it does not import transformers. Instead, if
`transformers.quantizers.auto` is already imported it registers now; otherwise a meta-path finder
waits for that module and registers right after it has executed. Any failure only warns: the direct
path, `arbq.load`, does not depend on it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    try:
        import arbq.packed.hf_quantizer  # noqa: F401  (registers on import)
    except Exception as e:  # never break transformers because of arbq
        warnings.warn(f"arbq: could not register the transformers quantizer: {e}", stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
