"""Static KV caches whose layers share one length counter, in the model's dtype or in int8.

Why one counter: transformers' ``StaticLayer`` keeps a ``cumulative_length`` tensor per layer and advances each in
its ``update``; in a compiled, CUDA-graph-captured one-token step of Llama-2-7B each advance is its own 1-element
kernel, 32 per step, about 41 us of ~2.5 ms in every format benchmarked.  The layers of a forward all write at the
same positions, so :class:`SharedLengthStaticCache` gives them one counter (:class:`SharedLength`) that only the
last layer advances: one kernel per step.

Why int8: a decode step reads the whole KV cache once per layer, and at batch 32 on Llama-2-7B that read is most of
the step (BENCHMARKS.md, end to end: 6.27 of 9.83 ms), so the 4-bit weights cannot make the step much faster; half
the cache bytes can.  Its price on SmolLM2 is +0.07% (FP) / +0.20% (DGQ) WikiText-2 perplexity (RESULTS.md, "An
int8 KV cache"; the rounding there is this module's :func:`quantize_rows`).

:class:`Int8StaticCache` is the shared-length cache whose layers (:class:`Int8StaticLayer`) round each new key and
value vector to int8 (``absmax / 127``, round half to even) as it is written.  A layer's ``update`` returns
``(codes, scales)`` pairs instead of float tensors; dgq's attention function (:mod:`dgq.attention`) takes them: a
one-token step reads the int8 cache in dgq's split-KV kernel, any other call (a prefill) attends with SDPA over the
dequantized values.  So the model must use that attention (:func:`dgq.attention.use_decode_attention`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from dgq.config import ConfigError
from dgq.formats import quantize_activations

KV = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # what a layer hands attention: a tensor, or int8 (codes, scales)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes of ``x [..., D]`` and their fp32 scales ``[...]``, one per vector of the last dimension: the
    per-token dynamic activation quantization (:func:`dgq.formats.quantize_activations`) applied to each key or
    value vector."""
    codes, scale = quantize_activations(x)
    return codes, scale.squeeze(-1)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale[..., None]).to(dtype)


class SharedLength:
    """The one length counter of a cache's layers: a 0-d int64 tensor (a tensor, as in ``StaticLayer``, so that a
    compiled step reads it without recompiling as it grows).  The first layer initialized moves it to its device,
    where it then stays at one address for the other layers and for a captured CUDA graph."""

    def __init__(self) -> None:
        self.count = torch.tensor(0, dtype=torch.int64)
        self.device: torch.device | None = None

    def on(self, device: torch.device) -> torch.Tensor:
        """The counter on ``device``; moved there at the first call.  Layers on several devices cannot share it."""
        if self.device is None:
            self.count, self.device = self.count.to(device), device
        elif self.device != device:
            raise ConfigError(f"a shared-length KV cache keeps all its layers on one device: its length is on "
                              f"{self.device}, a layer is on {device}")
        return self.count


class SharedLengthStaticLayer(StaticLayer):
    """One layer of :class:`SharedLengthStaticCache`: transformers' ``StaticLayer`` (``keys``/``values``
    ``[B, H, max_len, D]``, written in place) whose ``cumulative_length`` is the cache's :class:`SharedLength`.

    ``update`` is :meth:`write` (the new states at ``arange(kv_length) + count``, the count untouched) then
    :meth:`advance`, which adds ``kv_length`` to the count only in the layer built with ``advances`` (the last, which
    a forward updates last), so every layer of a forward writes at the length before it and the count grows once.
    ``write`` and ``advance`` are also public because a caller that compiles every block as one shared function
    (:class:`dgq.bench.LayerCache`) must not trace the ``advances`` branch: dynamo would guard on the flag and
    compile the last block a second graph."""

    storage_dtype: ClassVar[torch.dtype | None] = None  # of keys and values; None: the states' dtype

    def __init__(self, max_cache_len: int, length: SharedLength, advances: bool) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.length, self.advances = length, advances
        self.cumulative_length = length.count

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        self.cumulative_length = self.length.on(self.device)
        self._allocate()
        if not torch.compiler.is_compiling():  # fixed addresses, so that a captured step can write them in place
            for t in (*self._state(), self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _allocate(self) -> None:
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        dtype = self.storage_dtype or self.dtype
        self.keys = torch.zeros(*shape, self.k_head_dim, dtype=dtype, device=self.device)
        self.values = torch.zeros(*shape, self.v_head_dim, dtype=dtype, device=self.device)

    def _state(self) -> tuple[torch.Tensor, ...]:
        """The tensors this layer alone writes (the count is the cache's)."""
        return self.keys, self.values

    def _positions(self, kv_length: int) -> torch.Tensor:
        return torch.arange(kv_length, device=self.device) + self.cumulative_length

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[KV, KV]:
        positions = self._positions(key_states.shape[-2])
        self.keys.index_copy_(2, positions, key_states)
        self.values.index_copy_(2, positions, value_states)
        return self.keys, self.values

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[KV, KV]:
        """Store the new states after the cached ones, leaving the count as it is; returns what attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._store(key_states, value_states)

    def advance(self, kv_length: int) -> None:
        """Add ``kv_length`` to the shared count if this is the layer that advances it, else nothing."""
        if self.advances:
            self.cumulative_length.add_(kv_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
               ) -> tuple[KV, KV]:
        out = self.write(key_states, value_states)
        self.advance(key_states.shape[-2])
        return out

    def reset(self) -> None:
        """Zero this layer's tensors, and the shared count in the layer that advances it: once per cache reset."""
        if self.is_initialized:
            for t in self._state():
                t.zero_()
        if self.advances:
            self.cumulative_length.zero_()


class Int8StaticLayer(SharedLengthStaticLayer):
    """One layer of :class:`Int8StaticCache`: ``keys``/``values`` int8 ``[B, H, max_len, D]`` and
    ``key_scales``/``value_scales`` fp32 ``[B, H, max_len]``, written in place at the positions the float layer would
    write (the shared count), so masks and lengths work unchanged."""

    storage_dtype = torch.int8

    def _allocate(self) -> None:
        super()._allocate()
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.key_scales = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.value_scales = torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _state(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.key_scales, self.value_scales

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor
               ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Round and write the new positions; returns ``((keys, key_scales), (values, value_scales))``."""
        # on CUDA one kernel writes both (dgq.kernels.kv_write), bit-identical to the torch path below on the CPU
        if self.device.type == "cuda":
            from dgq.kernels.ops import write_kv_int8

            write_kv_int8(key_states, value_states, self.keys, self.values, self.key_scales, self.value_scales,
                          self.cumulative_length)
        else:
            positions = self._positions(key_states.shape[-2])
            for codes, scales, states in ((self.keys, self.key_scales, key_states),
                                          (self.values, self.value_scales, value_states)):
                q, s = quantize_rows(states)
                codes.index_copy_(2, positions, q)
                scales.index_copy_(2, positions, s)
        return (self.keys, self.key_scales), (self.values, self.value_scales)


def full_attention_only(cache: StaticCache) -> bool:
    """Whether every layer of transformers' ``cache`` attends to the whole sequence (no sliding-window layer): the
    models whose layers can share one length."""
    return all(type(layer) is StaticLayer for layer in cache.layers)


class SharedLengthStaticCache(StaticCache):
    """transformers' ``StaticCache`` whose layers (:attr:`layer_class`) share one :class:`SharedLength`, advanced
    by the last layer alone: between forwards the cache and every layer report the cached length, inside one the
    length before it.  Models with sliding-window layers are refused: their layers keep a rolling window, and their
    own length, that this class does not implement."""

    layer_class: ClassVar[type[SharedLengthStaticLayer]] = SharedLengthStaticLayer
    refusal: ClassVar[str] = ("a shared-length KV cache takes full-attention layers only; this model has {kinds} "
                              "(use transformers' StaticCache)")

    def __init__(self, config: object, max_cache_len: int, **kwargs: object) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        if not full_attention_only(self):
            raise ConfigError(self.refusal.format(kinds=", ".join(sorted({type(x).__name__ for x in self.layers}))))
        length, last = SharedLength(), len(self.layers) - 1
        self.layers = [self.layer_class(max_cache_len, length, advances=i == last) for i in range(last + 1)]


def float_static_cache(config: object, max_cache_len: int) -> StaticCache:
    """The float static cache of a decode step: :class:`SharedLengthStaticCache` where every layer attends to the
    whole sequence; transformers' ``StaticCache`` (a length per layer, one more kernel per layer and step) for a model
    with sliding-window layers, whose rolling windows the shared-length cache does not implement."""
    cache = StaticCache(config=config, max_cache_len=max_cache_len)  # (its layers allocate lazily: nothing held)
    return SharedLengthStaticCache(config=config, max_cache_len=max_cache_len) if full_attention_only(cache) else cache


class Int8StaticCache(SharedLengthStaticCache):
    """The shared-length cache with :class:`Int8StaticLayer` layers."""

    layer_class = Int8StaticLayer
    refusal = "an int8 KV cache takes full-attention layers only; this model has {kinds} (use the fp16 cache)"
