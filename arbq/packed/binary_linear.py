"""BinaryLinear: an nn.Linear replacement that holds only a packed layout's tensors and runs from them."""

from __future__ import annotations

import torch
from torch import nn

from arbq import kernels
from arbq.packed import layouts
from arbq.packed.codec import PackedLinear


class BinaryLinear(nn.Module):
    """y [..., N] = x [..., K] @ Ŵᵀ (+ bias), Ŵ: [N, K] given by the packed tensors of any layout
    (arbq.packed.layouts; `spec` is the layout's spec).

    Every packed tensor is a buffer named by its suffix (sign1, group, ... for "binary"; codes, zeros, scales
    for "uniform"), so the state dict keys are `<module>.sign1` etc. The product is computed by a kernel
    backend that runs the layout (arbq.kernels: "cpu" C++ from the bits, "triton", "torch" unpack + matmul
    for every layout), chosen by `backend` or ARBQ_KERNEL. Inference only: no gradients flow to the packed
    weights.
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

    def packed(self) -> PackedLinear:
        return PackedLinear(self.spec, {name: getattr(self, name) for name in self.spec.tensor_shapes()})

    def kernel_cache(self) -> dict:
        """A dict for backend-derived tensors, reset whenever a buffer is replaced, moved or changed in place."""
        key = tuple((b.data_ptr(), b._version) for b in self._buffers.values() if b is not None)
        if key != self._cache_key:
            self._cache_key, self._cache = key, {}
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> y: [..., N]
        lead, cache = x.shape[:-1], self.kernel_cache()
        if "packed" not in cache:  # per-call Python overhead matters at batch 1: build these once
            cache["packed"] = self.packed()
        p, name = cache["packed"], self.backend or kernels.default_name()
        key = ("backend", name, x.device.type)
        if key not in cache:
            cache[key] = kernels.pick(p, x, name)
        y = cache[key].matmul(p, x.reshape(-1, self.in_features), cache)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """Ŵ [N, K] fp32, the layout's equation (scales as stored)."""
        return layouts.dequantize(self.packed())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}, "
                f"bias={self.bias is not None}")
