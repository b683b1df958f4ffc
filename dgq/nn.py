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

from dgq.formats import DualGrainedWeight, int_matmul, quantize_activations, swiglu
from dgq.packing import layout_tile, pack_tiled, pack_u4, unpack_tiled, unpack_u4
from dgq.positions import current_first_rows

ActMode = Literal["none", "dynamic", "static"]


class QuantLinear(nn.Module):
    """A8W4 dual-grained Linear: packed int4 codes, int8 group scales and zero points, float channel scales.

    Its buffers are in the layout the CUDA kernels read (:mod:`dgq.packing`, :class:`dgq.kernels.gemm.KernelWeight`),
    so a model holds each packed weight once: ``codes`` uint8 ``[out, in / 2]`` (tiled), ``s2t`` int8 and ``zpt``
    uint8 ``[in / g, out]``, ``s1`` float32 ``[out]``, and the self-cleaning int32 split-K arrival counters
    ``split_scratch`` ``[2 out]`` (not saved).  The checkpoint stores the format's own layout (``weight``, ``s2``,
    ``zp``, :meth:`stored_tensors`); :meth:`load_stored` converts it back, both exactly.
    The only derived tensor is the CPU reference's widened int8 weight, cached under one rule: dropped whenever the
    module is moved or cast (``_apply``), rebuilt when a buffer is replaced or written in place (the cache key).
    With ``first_scale`` (static activations only) the layer also holds ``act_scale_first``, the static scale of
    every sequence's first position; which rows those are, the enclosing decoder block says (:mod:`dgq.positions`).
    With ``swiglu_input`` (set by :func:`dgq.fuse.fuse_projections` on a down projection, never saved) the layer
    also takes the fused gate/up output, ``2 in_features`` wide (told apart by that width), and its input is then
    :func:`dgq.formats.swiglu` of it: the kernel that quantizes the input forms the product as it reads, so the
    MLP's SiLU costs no launch and no pass of its own.
    With ``absmax_in_graph`` (set by :func:`dgq.fuse.fuse_projections` on the fused q/k/v and gate/up layers, whose
    input is a norm's output; never saved) a compiled CUDA graph computes each one-token row's absmax beside the
    norm (the compiler fuses the reduction into the norm's kernel) and hands it to the GEMV
    (:func:`dgq.kernels.ops.quantized_linear`): the same codes, without every CTA reading the whole row first.
    """

    STORED = {"codes": "weight", "s2t": "s2", "zpt": "zp"}  # buffer -> its checkpoint name (other buffers: same)

    def __init__(self, in_features: int, out_features: int, group_size: int, act_mode: ActMode = "dynamic",
                 bias: bool = False, device: torch.device | str | None = None,
                 out_dtype: torch.dtype = torch.float32, first_scale: bool = False) -> None:
        super().__init__()
        if act_mode not in ("dynamic", "static"):
            raise ValueError(f"QuantLinear needs int8 activations ('dynamic' or 'static'), got {act_mode!r}")
        if first_scale and act_mode != "static":
            raise ValueError("a first-position activation scale is a static scale; it needs act_mode 'static'")
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.act_mode = group_size, act_mode
        self.tile = layout_tile(in_features, group_size)
        groups = in_features // group_size
        self.register_buffer("codes", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("s2t", torch.ones(groups, out_features, dtype=torch.int8, device=device))
        self.register_buffer("zpt", torch.zeros(groups, out_features, dtype=torch.uint8, device=device))
        self.register_buffer("s1", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
        self.first_scale = first_scale
        if first_scale:  # only then: the state of every other layer stays what it was
            self.register_buffer("act_scale_first", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=out_dtype, device=device) if bias else None)
        self.register_buffer("split_scratch", torch.zeros(2 * out_features, dtype=torch.int32, device=device),
                             persistent=False)
        self._int8: tuple[tuple, torch.Tensor] | None = None
        self.swiglu_input = False
        self.absmax_in_graph = False

    @classmethod
    def from_weight(cls, dg: DualGrainedWeight, bias: torch.Tensor | None, act_mode: ActMode,
                    act_scale: torch.Tensor | None = None, act_scale_first: torch.Tensor | None = None,
                    ) -> "QuantLinear":
        """Build the layer from a validated :class:`DualGrainedWeight` (and the static activation scale, and with
        ``act_scale_first`` the first position's own)."""
        dg.validate()
        out, inp = dg.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(inp, out, dg.group_size, act_mode, bias is not None, dg.u4.device, dtype,
                    first_scale=act_scale_first is not None)
        if act_scale_first is not None:
            layer.act_scale_first.fill_(float(act_scale_first))
        layer.codes.copy_(pack_tiled(dg.u4, layer.tile))
        layer.s2t.copy_(dg.s2.t())
        layer.zpt.copy_(dg.zp.t())
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
        return DualGrainedWeight(u4=unpack_tiled(self.codes, self.tile), zp=self.zpt.t().contiguous(),
                                 s2=self.s2t.t().contiguous(), s1=self.s1, group_size=self.group_size)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The layout-bearing buffers in the checkpoint's layout, under their stored names (:data:`STORED`)."""
        return {"weight": pack_u4(unpack_tiled(self.codes, self.tile)), "s2": self.s2t.t().contiguous(),
                "zp": self.zpt.t().contiguous()}

    def load_stored(self, weight: torch.Tensor, s2: torch.Tensor, zp: torch.Tensor) -> None:
        """Take the checkpoint's tensors (:meth:`stored_tensors`' layout) as this layer's buffers, on their device."""
        device = weight.device
        self.register_buffer("codes", pack_tiled(unpack_u4(weight), self.tile))
        self.register_buffer("s2t", s2.t().contiguous())
        self.register_buffer("zpt", zp.t().contiguous())
        self.register_buffer("split_scratch", torch.zeros(2 * self.out_features, dtype=torch.int32, device=device),
                             persistent=False)
        self.s1, self.act_scale = self.s1.to(device, torch.float32), self.act_scale.to(device, torch.float32)
        if self.first_scale:
            self.act_scale_first = self.act_scale_first.to(device, torch.float32)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module signature
        """Moves and casts keep the channel and activation scales float32: they are the format's, not the model's
        dtype (``model.half()`` must not round them)."""
        self._int8 = None  # a move or cast leaves no derived copy behind on the old device
        kept = {name: self._buffers[name] for name in ("s1", "act_scale", "act_scale_first") if name in self._buffers}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self

    def kernel_layout(self):  # noqa: ANN201 - KernelWeight; its module imports triton, which the CPU path never needs
        """The CUDA kernels' view of this layer's buffers (:class:`dgq.kernels.gemm.KernelWeight`): no copy."""
        from dgq.kernels.gemm import KernelWeight

        return KernelWeight.of(self.codes, self.s2t, self.zpt, self.s1, self.split_scratch, self.group_size)

    def _int8_weight(self) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled graph widens in the graph: no Python-side cache there
            return self.dual_grained().int8_weight()
        key = tuple((t.data_ptr(), t._version) for t in (self.codes, self.s2t, self.zpt))
        if self._int8 is None or self._int8[0] != key:
            self._int8 = (key, self.dual_grained().int8_weight())
        return self._int8[1]

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Pure-PyTorch forward with the exact int32 accumulator (:func:`~dgq.formats.int_matmul`, an int8 GEMM on
        the CPU) and a float32 epilogue; the definition every kernel must match."""
        if self._takes_gate_up(x):
            x2 = swiglu(x.reshape(-1, 2 * self.in_features))
        else:
            x2 = x.reshape(-1, self.in_features)
        x_q, s_x = quantize_activations(x2, self.static_scales(x2.shape[0]))
        out = int_matmul(x_q, self._int8_weight()).float().mul_(s_x).mul_(self.s1)
        if self.bias is not None:
            out += self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton kernels through dgq's PyTorch operators (:mod:`dgq.kernels.ops`), which ``torch.compile``
        captures without a graph break; equal to :meth:`forward_reference` bit for bit (given the gate/up output, up
        to the SiLU's fast exponential and division: :func:`dgq.kernels.act_quant.quantize_activations_triton`)."""
        from dgq.kernels import TRITON_AVAILABLE
        if not TRITON_AVAILABLE:
            raise RuntimeError("QuantLinear on CUDA needs triton for its kernels; install triton, or call "
                               "forward_reference explicitly for the slow exact path")
        from dgq.kernels.ops import quantized_linear

        gate_up = self._takes_gate_up(x)
        x2 = x.reshape(-1, self.in_features * (2 if gate_up else 1))
        # static scales per row where the first positions have their own: the act-quant kernel takes them as it
        # takes one (and a one-token GEMV's row has one)
        out = quantized_linear(x2, self.codes, self.s2t, self.zpt, self.s1, self.split_scratch, self.group_size,
                               self.static_scales(x2.shape[0]), self.bias, x.dtype, gate_up, self.absmax_in_graph)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _takes_gate_up(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a fused gate/up output for this layer to form ``silu(gate) * up`` from."""
        return self.swiglu_input and x.shape[-1] == 2 * self.in_features

    def static_scales(self, rows: int) -> torch.Tensor | None:
        """The static activation scale: None (dynamic), the per-tensor scalar, or with ``first_scale`` a per-row
        ``[rows, 1]`` array holding ``act_scale_first`` at the first positions and ``act_scale`` elsewhere."""
        if self.act_mode != "static":
            return None
        if not self.first_scale:
            return self.act_scale
        first = current_first_rows(rows).to(self.act_scale.device)
        return torch.where(first, self.act_scale_first, self.act_scale).reshape(rows, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Triton kernels for CUDA inputs (they equal :meth:`forward_reference`); the reference elsewhere."""
        if x.is_cuda:
            return self.forward_kernels(x)
        return self.forward_reference(x)

    def extra_repr(self) -> str:
        first = ", first_scale=True" if self.first_scale else ""
        swiglu = ", swiglu_input=True" if self.swiglu_input else ""
        absmax = ", absmax_in_graph=True" if self.absmax_in_graph else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, act={self.act_mode}, bias={self.bias is not None}{first}{swiglu}"
                f"{absmax}")


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
