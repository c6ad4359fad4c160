"""BinaryLinear: an nn.Linear replacement that holds only a packed layout's tensors and runs from them."""

from __future__ import annotations

import torch
from torch import nn

from arbq import kernels
from arbq.errors import ArbqError
from arbq.packed import layouts
from arbq.packed.codec import PackedLinear


class BinaryLinear(nn.Module):
    """y [..., N] = x [..., K] @ Ŵᵀ (+ bias), Ŵ: [N, K] given by the packed tensors of any layout
    (arbq.packed.layouts; `spec` is the layout's spec).

    Every packed tensor is a buffer named by its suffix (sign1, group, ... for "binary"; codes, zeros, scales
    for "uniform"), so the state dict keys are `<module>.sign1` etc. The product is computed by a kernel
    backend that runs the layout (arbq.kernels: "cpu" C++ from the bits, "triton", "torch" unpack + matmul
    for every layout), chosen by `backend` or ARBQ_KERNEL. A layout that stores its columns in another order
    (layouts.input_columns: an N:M run order) gets x[..., π] instead of x. Inference only: no gradients flow to
    the packed weights.
    """

    def __init__(self, spec, bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, backend: str | None = None):
        super().__init__()
        self.spec = spec
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.backend = backend
        for name, (shape, dt) in spec.tensor_shapes().items():
            self.register_buffer(name, torch.empty(shape, dtype=dt, device=device))
        self.register_buffer("bias", torch.empty(spec.out_features, dtype=dtype, device=device) if bias else None)
        self._cache_key: tuple = ()
        self._cache: dict = {}
        self._fast: tuple | None = None      # (ids of the buffers, a backend's bound decode call)
        self._cols: tuple | None = None      # (ids of the buffers, layouts.input_columns of them)

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend, self._fast = name, None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._cache_key, self._cache, self._fast, self._cols = (), {}, None, None  # in place, maybe no version bump

    def __getstate__(self) -> dict:
        # what the kernels derived (tables, the backend module, a bound call) is rebuilt, not copied or pickled
        return {**self.__dict__, "_fast": None, "_cache_key": (), "_cache": {}, "_cols": None}

    @classmethod
    def from_packed(cls, p: PackedLinear, bias: torch.Tensor | None = None,
                    backend: str | None = None) -> BinaryLinear:
        dev = p.device
        mod = cls(p.spec, bias=bias is not None, device="meta", backend=backend)
        for name, t in p.tensors.items():
            setattr(mod, name, t)
        if bias is not None:
            mod.bias = bias.to(dev)
        return mod

    def adopt(self, p: PackedLinear, restore_off_cpu: bool = False) -> None:
        """Hold p (this layer's Ŵ in another layout, e.g. a kernel's resident form) instead of the current
        tensors, which are released; what the kernels derived is rebuilt on the next call. restore_off_cpu: when
        the module is later moved off the CPU (`.to("cuda")`), it goes back to the current layout, which the GPU
        kernels read (layouts.from_lookup_form)."""
        if (p.spec.out_features, p.spec.in_features) != (self.out_features, self.in_features):
            raise ArbqError(f"cannot adopt a {p.spec.out_features}x{p.spec.in_features} layout in a "
                            f"{self.out_features}x{self.in_features} BinaryLinear")
        self._restore = self.spec.layout if restore_off_cpu else None
        bias = self._buffers.pop("bias")
        for name in self.spec.tensor_shapes():
            del self._buffers[name]
        self.spec = p.spec
        for name, t in p.tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self._cache_key, self._cache, self._fast, self._cols = (), {}, None, None

    @staticmethod
    def _off_cpu(t: torch.Tensor) -> bool:
        return t.device.type != "cpu"

    def _apply(self, fn, recurse: bool = True):
        """nn.Module's (`.to`, `.cuda`, ...); a layer held in a CPU kernel's layout (adopt's restore_off_cpu) that
        lands off the CPU goes back to its stored layout, rearranged on the CPU and moved to where it landed."""
        out = super()._apply(fn, recurse)
        restore = self.__dict__.get("_restore")
        if restore is None:
            return out
        p = self.packed()
        first = next(iter(p.tensors.values()))
        if self._off_cpu(first):
            q = layouts.from_lookup_form(PackedLinear(p.spec, {k: t.cpu() for k, t in p.tensors.items()}), restore)
            self.adopt(PackedLinear(q.spec, {k: t.to(first.device) for k, t in q.tensors.items()}))
        return out

    def packed(self) -> PackedLinear:
        return PackedLinear(self.spec, {name: getattr(self, name) for name in self.spec.tensor_shapes()})

    def kernel_cache(self) -> dict:
        """A dict for backend-derived tensors, reset whenever a buffer is replaced, moved or changed in place
        (inference-mode tensors keep no version counter: for them, by load_state_dict)."""
        key = tuple((b.data_ptr(), -1 if b.is_inference() else b._version)
                    for b in self._buffers.values() if b is not None)
        if key != self._cache_key:
            self._cache_key, self._cache = key, {}
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y [..., N] = x [..., K] @ Ŵᵀ (+ bias). A decode call goes straight to the backend's bound call (bind)
        while the buffers are the ones it was bound to; it declines (None) whatever it cannot vouch for."""
        ids = tuple(map(id, self._buffers.values()))
        if getattr(self.spec, "ordered", False):
            if self._cols is None or self._cols[0] != ids:
                self._cols = (ids, layouts.input_columns(self.packed()))
            x = x.index_select(-1, self._cols[1])
        fast = self._fast
        if fast is not None and fast[0] == ids:
            y = fast[1](x)
            if y is not None:
                return y
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, cache = x.shape[:-1], self.kernel_cache()
        if "packed" not in cache:  # per-call Python overhead matters at batch 1: build these once
            cache["packed"] = self.packed()
        p, name = cache["packed"], self.backend or kernels.default_name()
        key = ("backend", name, x.device.type)
        if key not in cache:
            cache[key] = kernels.pick(p, x, name)
        mod = cache[key]
        y = mod.matmul(p, x.reshape(-1, self.in_features), cache)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if hasattr(mod, "bind"):
            env = [] if self.backend else [kernels.ENV]
            watch = [b for b in self._buffers.values() if b is not None]
            call = mod.bind(p, x, cache, self.bias, watch, env)
            if call is not None:          # (a prefill call keeps the decode binding: it checks itself)
                self._fast = (tuple(map(id, self._buffers.values())), call)
        return y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """Ŵ [N, K] fp32, the layout's equation (scales as stored)."""
        return layouts.dequantize(self.packed())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}, "
                f"bias={self.bias is not None}")
