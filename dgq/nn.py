"""Quantized Linear modules: the real A8W4 layer and the fake-quant layer used by the baselines.

:class:`QuantLinear` owns the packed dual-grained tensors (:mod:`dgq.formats`) and computes
``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b``; its reference forward reproduces the int32 accumulator exactly on any
device, and its fast forward (CUDA) calls the Triton kernels, which must equal the reference.
:class:`FakeQuantLinear` holds a float weight that already went through a (non dual-grained) quantizer, plus an
optional activation quantizer, so every baseline runs through the same pipeline.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dgq.formats import DualGrainedWeight, int_matmul, quantize_activations
from dgq.packing import pack_u4, unpack_u4

ActMode = Literal["none", "dynamic", "static"]


class QuantLinear(nn.Module):
    """A8W4 dual-grained Linear: packed int4 codes, int8 group scales and zero points, float channel scales."""

    def __init__(self, in_features: int, out_features: int, group_size: int, act_mode: ActMode = "dynamic",
                 bias: bool = False, device: torch.device | str | None = None,
                 out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if act_mode not in ("dynamic", "static"):
            raise ValueError(f"QuantLinear needs int8 activations ('dynamic' or 'static'), got {act_mode!r}")
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.act_mode = group_size, act_mode
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // 2, out_features, dtype=torch.uint8, device=device))
        self.register_buffer("s2", torch.ones(out_features, groups, dtype=torch.int8, device=device))
        self.register_buffer("zp", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("s1", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=out_dtype, device=device) if bias else None)
        # Derived views of the buffers, never saved.  One rule for both: built on first use, dropped whenever the
        # module is moved or cast (``_apply``), rebuilt when a buffer is replaced or written in place (the key).
        # "int8": the reference path's int8 weight W_s8 [out, in] (widened once, not per forward);
        # "kernel": the CUDA kernel's layout (:class:`dgq.kernels.gemm.KernelWeight`).
        self._derived: dict[str, tuple[tuple, object]] = {}

    @classmethod
    def from_weight(cls, dg: DualGrainedWeight, bias: torch.Tensor | None, act_mode: ActMode,
                    act_scale: torch.Tensor | None = None) -> "QuantLinear":
        """Build the layer from a validated :class:`DualGrainedWeight` (and the static activation scale)."""
        dg.validate()
        out, inp = dg.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(inp, out, dg.group_size, act_mode, bias is not None, dg.u4.device, dtype)
        layer.qweight.copy_(pack_u4(dg.u4))
        layer.s2.copy_(dg.s2)
        layer.zp.copy_(dg.zp)
        layer.s1.copy_(dg.s1)
        if act_mode == "static":
            if act_scale is None:
                raise ValueError("static activation quantization needs a calibrated act_scale")
            layer.act_scale.fill_(float(act_scale))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def dual_grained(self) -> DualGrainedWeight:
        """The unpacked format tensors this layer holds."""
        return DualGrainedWeight(u4=unpack_u4(self.qweight), zp=self.zp, s2=self.s2, s1=self.s1,
                                 group_size=self.group_size)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        self._derived = {}  # a move or cast leaves no derived copy behind on the old device
        return super()._apply(fn, recurse)

    def _cached(self, name: str, build):  # noqa: ANN001, ANN202
        key = tuple((t.data_ptr(), t._version) for t in (self.qweight, self.s2, self.zp, self.s1))
        hit = self._derived.get(name)
        if hit is None or hit[0] != key:
            hit = self._derived[name] = (key, build())
        return hit[1]

    def kernel_layout(self):  # noqa: ANN201 - KernelWeight; its module imports triton, which the CPU path never needs
        """The CUDA kernel's view of this layer's tensors (:class:`dgq.kernels.gemm.KernelWeight`), cached."""
        def build():  # noqa: ANN202
            from dgq.kernels.gemm import KernelWeight
            return KernelWeight.from_format(self.qweight, self.s2, self.zp, self.s1, self.group_size)
        return self._cached("kernel", build)

    def _int8_weight(self) -> torch.Tensor:
        return self._cached("int8", lambda: self.dual_grained().int8_weight())

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Pure-PyTorch forward with the exact int32 accumulator (:func:`~dgq.formats.int_matmul`, an int8 GEMM on
        the CPU) and a float32 epilogue; the definition every kernel must match."""
        static = self.act_scale if self.act_mode == "static" else None
        x2 = x.reshape(-1, self.in_features)
        x_q, s_x = quantize_activations(x2, static)
        out = int_matmul(x_q, self._int8_weight()).float().mul_(s_x).mul_(self.s1)
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Triton kernels for CUDA inputs (they equal :meth:`forward_reference`); the reference elsewhere."""
        if x.is_cuda:
            from dgq.kernels import TRITON_AVAILABLE
            if not TRITON_AVAILABLE:
                raise RuntimeError("QuantLinear on CUDA needs triton for its kernels; install triton, or call "
                                   "forward_reference explicitly for the slow exact path")
            from dgq.kernels.linear import a8w4_linear
            static = self.act_scale if self.act_mode == "static" else None
            out = a8w4_linear(x.reshape(-1, self.in_features), self.kernel_layout(), static, self.bias, x.dtype)
            return out.reshape(*x.shape[:-1], self.out_features)
        return self.forward_reference(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, act={self.act_mode}, bias={self.bias is not None}")


class FakeQuantLinear(nn.Module):
    """A Linear whose weight already holds quantized-then-dequantized values, with optional int8 activations."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_mode: ActMode,
                 act_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        if act_mode == "static" and act_scale is None:
            raise ValueError("static activation quantization needs a calibrated act_scale")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.act_mode = act_mode
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        scale = torch.ones(()) if act_scale is None else act_scale.detach().float().reshape(())
        self.register_buffer("act_scale", scale.to(weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_mode != "none":
            x_s8, s_x = quantize_activations(x, self.act_scale if self.act_mode == "static" else None)
            x = (x_s8.float() * s_x).to(x.dtype)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.act_mode}"
