"""A static KV cache that stores keys and values as int8, one fp32 scale per position and head: half the bytes.

Why: a decode step reads the whole KV cache once per layer, and at batch 32 on Llama-2-7B that read is most of the
step (BENCHMARKS.md, end to end: 6.27 of 9.83 ms), so the 4-bit weights cannot make the step much faster; half the
cache bytes can.  Its price on SmolLM2 is +0.07% (FP) / +0.20% (DGQ) WikiText-2 perplexity (RESULTS.md, "An int8 KV
cache"; the rounding there is this module's :func:`quantize_rows`).

:class:`Int8StaticCache` is transformers' ``StaticCache`` whose layers (:class:`Int8StaticLayer`) round each new key
and value vector to int8 (``absmax / 127``, round half to even) as it is written.  A layer's ``update`` returns
``(codes, scales)`` pairs instead of float tensors; dgq's attention function (:mod:`dgq.attention`) takes them: a
one-token step reads the int8 cache in dgq's split-KV kernel, any other call (a prefill) attends with SDPA over the
dequantized values.  So the model must use that attention (:func:`dgq.attention.use_decode_attention`).
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from dgq.config import ConfigError
from dgq.formats import quantize_activations


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes of ``x [..., D]`` and their fp32 scales ``[...]``, one per vector of the last dimension: the
    per-token dynamic activation quantization (:func:`dgq.formats.quantize_activations`) applied to each key or
    value vector."""
    codes, scale = quantize_activations(x)
    return codes, scale.squeeze(-1)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale[..., None]).to(dtype)


class Int8StaticLayer(StaticLayer):
    """One layer of :class:`Int8StaticCache`: ``keys``/``values`` int8 ``[B, H, max_len, D]`` and
    ``key_scales``/``value_scales`` fp32 ``[B, H, max_len]``, written in place at the positions transformers'
    ``StaticLayer`` would write (its ``cumulative_length``), so masks and lengths work unchanged."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys = torch.zeros(*shape, self.k_head_dim, dtype=torch.int8, device=self.device)
        self.values = torch.zeros(*shape, self.v_head_dim, dtype=torch.int8, device=self.device)
        self.key_scales = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.value_scales = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():  # fixed addresses, so that a captured step can write them in place
            for t in (self.keys, self.values, self.key_scales, self.value_scales, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
               ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Round and write the new positions; returns ``((keys, key_scales), (values, value_scales))``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # on CUDA one kernel writes both (dgq.kernels.kv_write), bit-identical to the torch path below on the CPU
        if self.device.type == "cuda":
            from dgq.kernels.ops import write_kv_int8

            write_kv_int8(key_states, value_states, self.keys, self.values, self.key_scales, self.value_scales,
                          self.cumulative_length)
        else:
            positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
            for codes, scales, states in ((self.keys, self.key_scales, key_states),
                                          (self.values, self.value_scales, value_states)):
                q, s = quantize_rows(states)
                codes.index_copy_(2, positions, q)
                scales.index_copy_(2, positions, s)
        self.cumulative_length.add_(key_states.shape[-2])
        return (self.keys, self.key_scales), (self.values, self.value_scales)

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self.key_scales.zero_()
            self.value_scales.zero_()


class Int8StaticCache(StaticCache):
    """transformers' ``StaticCache`` with :class:`Int8StaticLayer` layers.  Models with sliding-window layers are
    refused (their layers keep a rolling window this class does not implement)."""

    def __init__(self, config: object, max_cache_len: int, **kwargs: object) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        if any(type(layer) is not StaticLayer for layer in self.layers):
            kinds = sorted({type(layer).__name__ for layer in self.layers})
            raise ConfigError(f"an int8 KV cache takes full-attention layers only; this model has "
                              f"{', '.join(kinds)} (use the fp16 cache)")
        self.layers = [Int8StaticLayer(max_cache_len=max_cache_len) for _ in self.layers]
