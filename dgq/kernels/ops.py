"""dgq's kernels as PyTorch operators, so that ``torch.compile`` and CUDA graphs capture a whole model step.

Seven operators (``torch.library.custom_op``, each with a fake implementation that gives the output's shape and
dtype without running anything): ``dgq::a8w4_linear`` (a whole A8W4 layer from float activations, dynamic or static
scale: what :func:`dgq.kernels.linear.a8w4_linear` runs), ``dgq::quantize_activations`` (dynamic, per token: the
W8A8 peer's), ``dgq::a8w4_mm`` (the GEMM paths of :mod:`dgq.kernels.linear` on int8 codes), ``dgq::int8_mm`` (the
int8 GEMM on an int8 weight: W8A8 layers, the benchmarks' peer), ``dgq::int8_rows_linear`` (the int8 LM head,
weight-only: :class:`dgq.int8_rows.Int8Linear`), ``dgq::decode_attention``
(:mod:`dgq.attention`) and ``dgq::write_kv_int8`` (:mod:`dgq.kv_cache`'s update on CUDA, which mutates the cache
in place and says so).  To the compiler each is one opaque call with no Python inside the captured graph; a CUDA
graph replays their kernels.

:func:`quantized_linear` is what :meth:`dgq.nn.QuantLinear.forward_kernels` calls:

* eagerly it calls the kernels' Python functions directly: the operator dispatch would only add host time to a
  launch-bound path, and the kernels are the same;
* compiled for CUDA it calls ``dgq::a8w4_linear``: the exact act-quant kernel then the GEMM or GEMV (which
  launches early and waits for the codes: programmatic dependent launch), or at one token with the row's absmax
  from the graph (``absmax_in_graph``) the GEMV that quantizes inside (one launch).  Compiled for the CPU
  (:data:`ACT_QUANT_IN_GRAPH`), the activation quantization is written in plain torch operations
  (:func:`dgq.formats.quantize_activations`, the reference itself), which the compiler fuses into the kernel that
  produces the activation (the RMSNorm, the SiLU-and-product), and ``dgq::a8w4_mm`` multiplies; inductor's C++
  divides exactly.

On CUDA the fused form is not the default: inductor's Triton code divides approximately (``div.full``), and on the
H100 it gave 4 of 40 row scales and one code different from the reference (``pytest -m cuda``).  With
``eager_numerics.division_rounding`` and ``emulate_precision_casts`` it is exact (the same test passes) but slower
end to end: Llama-2-7B decode at batch 1, 303 tok/s against 322 through ``dgq::a8w4_linear`` (it gives up the
one-launch GEMV on o_proj and down_proj, and emulates exact division and casts in every inductor kernel; the two
were not measured apart: benchmarks/notes_e2e.md, session 7).

The split-K arrival counters (``split_scratch``) are counted up and rearmed to zero by every call, so
``dgq::a8w4_mm`` and ``dgq::a8w4_linear`` declare no mutation: no caller can observe one.
"""

from __future__ import annotations

import torch

from dgq.formats import quantize_activations, row_absmax_bits, swiglu as swiglu_product
from dgq.kernels import decode_attention as _decode_attention
from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight
from dgq.kernels.int8_gemm import int8_matmul
from dgq.kernels.int8_rows import int8_rows_matmul
from dgq.kernels.kv_write import write_int8
from dgq.kernels.linear import a8w4_linear, a8w4_mm, takes_row_absmax

# per device type, compiled: quantize with torch ops the compiler fuses into the producer (else dgq's exact kernel)
ACT_QUANT_IN_GRAPH = {"cpu": True, "cuda": False}


@torch.library.custom_op("dgq::quantize_activations", mutates_args=())
def _quantize_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_activations_triton(x)


@_quantize_dynamic.register_fake
def _(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("dgq::a8w4_mm", mutates_args=())
def _a8w4_mm(x_s8: torch.Tensor, s_x: torch.Tensor, codes: torch.Tensor, s2t: torch.Tensor, zpt: torch.Tensor,
             s1: torch.Tensor, split_scratch: torch.Tensor, group_size: int, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    return a8w4_mm(x_s8, s_x, KernelWeight.of(codes, s2t, zpt, s1, split_scratch, group_size), bias, out_dtype)


@_a8w4_mm.register_fake
def _(x_s8: torch.Tensor, s_x: torch.Tensor, codes: torch.Tensor, s2t: torch.Tensor, zpt: torch.Tensor,
      s1: torch.Tensor, split_scratch: torch.Tensor, group_size: int, bias: torch.Tensor | None,
      out_dtype: torch.dtype) -> torch.Tensor:
    return x_s8.new_empty((x_s8.shape[0], codes.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dgq::a8w4_linear", mutates_args=())
def _a8w4_linear(x: torch.Tensor, codes: torch.Tensor, s2t: torch.Tensor, zpt: torch.Tensor, s1: torch.Tensor,
                 split_scratch: torch.Tensor, group_size: int, static_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, swiglu: bool,
                 row_absmax: torch.Tensor | None = None) -> torch.Tensor:
    return a8w4_linear(x, KernelWeight.of(codes, s2t, zpt, s1, split_scratch, group_size), static_scale, bias,
                       out_dtype, swiglu, row_absmax)


@_a8w4_linear.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, s2t: torch.Tensor, zpt: torch.Tensor, s1: torch.Tensor,
      split_scratch: torch.Tensor, group_size: int, static_scale: torch.Tensor | None, bias: torch.Tensor | None,
      out_dtype: torch.dtype, swiglu: bool, row_absmax: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((x.shape[0], codes.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dgq::int8_mm", mutates_args=())
def _int8_mm(x_s8: torch.Tensor, s_x: torch.Tensor, w_s8: torch.Tensor, s1: torch.Tensor, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    return int8_matmul(x_s8, w_s8, s_x, s1, bias, out_dtype)


@_int8_mm.register_fake
def _(x_s8: torch.Tensor, s_x: torch.Tensor, w_s8: torch.Tensor, s1: torch.Tensor, bias: torch.Tensor | None,
      out_dtype: torch.dtype) -> torch.Tensor:
    return x_s8.new_empty((x_s8.shape[0], w_s8.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dgq::int8_rows_linear", mutates_args=())
def _int8_rows_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return int8_rows_matmul(x, codes, scale)


@_int8_rows_linear.register_fake
def _(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], codes.shape[0]))


def int8_rows_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`dgq.kernels.int8_rows.int8_rows_matmul` (the int8 LM head): called directly eagerly, as an operator
    compiled."""
    if not torch.compiler.is_compiling():
        return int8_rows_matmul(x, codes, scale)
    return torch.ops.dgq.int8_rows_linear(x, codes, scale)


@torch.library.custom_op("dgq::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    return _decode_attention.decode_attention(q, k, v, mask, scale, k_scale=k_scale, v_scale=v_scale)


@_decode_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
      k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    return q.new_empty((q.shape[0], 1, q.shape[1], q.shape[3]), dtype=q.dtype)


@torch.library.custom_op("dgq::write_kv_int8", mutates_args=("keys", "values", "key_scales", "value_scales"))
def _write_kv_int8_op(key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      key_scales: torch.Tensor, value_scales: torch.Tensor, start: torch.Tensor) -> None:
    write_int8(key_states, value_states, keys, values, key_scales, value_scales, start)


@_write_kv_int8_op.register_fake
def _(key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
      key_scales: torch.Tensor, value_scales: torch.Tensor, start: torch.Tensor) -> None:
    return None


def write_kv_int8(key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  key_scales: torch.Tensor, value_scales: torch.Tensor, start: torch.Tensor) -> None:
    """:func:`dgq.kernels.kv_write.write_int8` (new keys and values rounded into the int8 cache, in place): called
    directly eagerly, as an operator compiled."""
    if not torch.compiler.is_compiling():
        return write_int8(key_states, value_states, keys, values, key_scales, value_scales, start)
    return torch.ops.dgq.write_kv_int8(key_states, value_states, keys, values, key_scales, value_scales, start)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dgq.kernels.decode_attention.decode_attention` (an int8 K and V with their scales, or float ones):
    called directly eagerly, as an operator compiled."""
    if not torch.compiler.is_compiling():
        return _decode_attention.decode_attention(q, k, v, mask, scale, k_scale=k_scale, v_scale=v_scale)
    return torch.ops.dgq.decode_attention(q, k, v, mask, scale, k_scale, v_scale)


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes and scales of ``x`` for a compiled graph (module docstring: in the graph or dgq's
    operator)."""
    if ACT_QUANT_IN_GRAPH.get(x.device.type, False):
        return quantize_activations(x)
    return torch.ops.dgq.quantize_activations(x)


def int8_linear(x: torch.Tensor, w_s8: torch.Tensor, s1: torch.Tensor, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W8A8: per-token int8 ``x`` (2-D) times a per-channel int8 weight ``w_s8 [N, K]`` with scales ``s1``."""
    if not torch.compiler.is_compiling():
        x_s8, s_x = quantize_activations_triton(x)
        return int8_matmul(x_s8, w_s8, s_x, s1, bias, out_dtype)
    x_s8, s_x = _quantize(x)
    return torch.ops.dgq.int8_mm(x_s8, s_x, w_s8, s1, bias, out_dtype)


def quantized_linear(x: torch.Tensor, codes: torch.Tensor, s2t: torch.Tensor, zpt: torch.Tensor, s1: torch.Tensor,
                     split_scratch: torch.Tensor, group_size: int, static_scale: torch.Tensor | None,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, swiglu: bool = False,
                     absmax_in_graph: bool = False) -> torch.Tensor:
    """``O = (s_x * s1) * (X_s8 @ W_s8ᵀ) + b`` for a 2-D ``x`` from a layer's buffers (module docstring);
    ``swiglu``: ``X`` is :func:`dgq.formats.swiglu` of ``x``, formed by the kernel that quantizes it.
    ``absmax_in_graph`` (:attr:`dgq.nn.QuantLinear.absmax_in_graph`): compiled for CUDA, where the one-token TMA
    GEMV runs, each row's absmax is computed in the graph, which fuses it into the kernel that produces ``x``."""
    if not torch.compiler.is_compiling():
        kw = KernelWeight.of(codes, s2t, zpt, s1, split_scratch, group_size)
        return a8w4_linear(x, kw, static_scale, bias, out_dtype, swiglu)
    if not ACT_QUANT_IN_GRAPH.get(x.device.type, False):
        row_absmax = None
        if absmax_in_graph:  # which kernel the operator will run decides whether the graph computes the absmax
            kw = KernelWeight.of(codes, s2t, zpt, s1, split_scratch, group_size)
            if takes_row_absmax(x.shape[0], kw, x.device, static_scale is None, swiglu):
                row_absmax = row_absmax_bits(x.detach())
        # detached as the eager kernels' output is (no gradient flows through rounding), so that a model compiled
        # with grad mode on does not make the compiler trace a backward the operator does not have
        return torch.ops.dgq.a8w4_linear(x.detach(), codes, s2t, zpt, s1, split_scratch, group_size, static_scale, bias,
                                         out_dtype, swiglu, row_absmax)
    if swiglu:  # the reference's torch operations, which the compiler fuses with the quantization below
        x = swiglu_product(x)
    x_s8, s_x = quantize_activations(x, static_scale)
    return torch.ops.dgq.a8w4_mm(x_s8, s_x, codes, s2t, zpt, s1, split_scratch, group_size, bias, out_dtype)
