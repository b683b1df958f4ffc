"""Speed of a model on the local GPU: prefill latency and decode throughput, shared by ``dgq bench`` and
``benchmarks/e2e.py`` so both measure the same way (CUDA events, median after warm-up).

How a step runs (``mode``), the same for every format:

* decode ``"compiled"`` (the default): the model compiled (:func:`compiled`: ``torch.compile(fullgraph=True)``;
  inductor fuses norms, rotary embedding, the activation quantization into its producer), and the one-token step
  captured in a CUDA graph and replayed, as gpt-fast does; ``"graph"``: the eager step captured (no compiler);
* prefill ``"graph"`` (the default): the compiled forward captured in a CUDA graph per length (bucket);
  ``"compiled"``: the same forward run without a graph; ``"eager"``: no compiler.  On an H100 (Llama-2-7B,
  benchmarks/notes_e2e.md) the graph won at every length measured: 10.5 ms at 256 tokens against 40 ms compiled
  and 70 ms eager, whose host time exceeds the GPU's.

A capture or compile failure is raised, never replaced by a slower mode: a figure always says how it was made.
"""

from __future__ import annotations

import functools
import statistics
from collections import defaultdict
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from dgq.kv_cache import KV

DECODE_MODES = ("compiled", "graph")
KV_CACHES = ("fp16", "int8")  # the model's dtype, or dgq.kv_cache's int8 codes with per-position scales
PREFILL_MODES = ("graph", "compiled", "eager")


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` CUDA-event timings after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def warm_up(fn: Callable[[], object], calls: int = 3) -> None:
    """``fn`` called ``calls`` times on a side stream, as a capture wants: autotuning, compilation and lazy
    allocations happen here, outside the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()


def capture(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` (no arguments, fixed input tensors, warmed up) captured in a CUDA graph; returns the replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def captured(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` warmed up (:func:`warm_up`) and captured (:func:`capture`); returns the replay."""
    warm_up(fn, warmup)
    return capture(fn)


# inductor's kernels launched programmatically dependent (:mod:`dgq.kernels.pdl`; generated only for CUDA devices of
# compute capability >= 9, so a no-op elsewhere): each waits for its producer inside and lets its consumer launch
# after its own loads, so dgq's GEMVs request their weight tiles while the norm or SiLU before them still runs.
# H100, Llama-2-7B, batch-1 decode step, every format compiled alike (benchmarks/notes_e2e.md, session 11): DGQ
# 360.8 -> 377.6 tok/s (387.7 with dgq's decode attention launched the same way), FP16 157.5 -> 155.6 and W8A8
# 155.0 -> 156.6 (within their run-to-run spread: FP16 and W8A8 run cuBLAS or a GEMM that waits at its start).
COMPILE_OPTIONS = {"triton.enable_pdl": True}
_COMPILED: dict[tuple[int, bool], Callable] = {}  # (id(model), dynamic) -> compiled model, built once per process
SCOPES = ("blocks", "whole")
SCOPE = "blocks"  # what :func:`compiled` compiles (benchmarks/e2e.py --compile-scope measures both)


class LayerCache:
    """One layer of a transformers KV cache, standing for the whole cache inside that layer's block.

    A block's attention calls ``cache.update(k, v, self.layer_idx)`` and the cache indexes its Python
    list of layers with that int, so dynamo specializes the traced block on the index: the guard
    ``self._modules['self_attn'].layer_idx == 0`` fails on the next block, and every block compiles its own graph
    (also with ``allow_unspec_int_on_nn_module``: indexing a list with the int specializes it again).  This view
    is chosen outside the compiled code, by the block's position, and ignores the index it is given, so the traced
    code reads the same attributes of whichever layer it is handed.

    For the same reason a layer sharing its cache's length (:class:`dgq.kv_cache.SharedLengthStaticLayer`) is not
    traced through its ``update``: that branches on the Python flag ``advances``, true in the last layer alone, so
    dynamo would guard on it and compile the last block a second graph.  The traced code calls the layer's
    ``write`` (the same for every layer; the count untouched), and :class:`SharedBlockForward` calls
    :meth:`advance` after the compiled block, eagerly: one add per forward, outside the block's graph (a step's
    CUDA graph captures it with the embedding and the head)."""

    def __init__(self, cache: object, index: int) -> None:
        from dgq.kv_cache import SharedLengthStaticLayer

        layers = getattr(cache, "layers", ())
        if index >= len(layers):  # a cache that appends its layers lazily (DynamicCache) holds none to hand out yet
            raise ValueError(f"a compiled block needs a KV cache whose layers already exist (StaticCache); "
                             f"{type(cache).__name__} has {len(layers)}, block {index} needs its own")
        self.layer = layers[index]
        self.shares_length = isinstance(self.layer, SharedLengthStaticLayer)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[KV, KV]:
        if self.shares_length:
            return self.layer.write(key_states, value_states)
        return self.layer.update(key_states, value_states, *args, **kwargs)

    def place(self, device: torch.device) -> None:
        """Before the block: the shared length moved to ``device`` (:meth:`dgq.kv_cache.SharedLength.on`) here,
        outside the compiled code.  Layers first used inside it would otherwise trace the move in the first block
        and not in the next, and dynamo would compile each its own graph."""
        if self.shares_length:
            self.layer.length.on(device)

    def advance(self, kv_length: int) -> None:
        """After the block: the shared length advanced by ``kv_length`` if this layer is the one advancing it."""
        if self.shares_length:
            self.layer.advance(kv_length)


def _run_block(block: nn.Module, *args: object, **kwargs: object) -> object:
    """The one function every block runs in (:func:`compiled`): the block is an input, so its weights are too."""
    return type(block).forward(block, *args, **kwargs)


@functools.cache
def _block_code() -> Callable:
    """:func:`_run_block` compiled (at its first call, once per input kind); made on first use, as creating it
    imports the compiler, seconds that ``dgq``'s command line, which imports this module, should not pay."""
    return torch.compile(_run_block, fullgraph=True, options=COMPILE_OPTIONS)


CACHE_KWARGS = ("cache", "past_key_values")  # the name a block receives its KV cache by: transformers 5.24 renamed
# past_key_values (an alias until 5.40); the model's own forward takes either


class SharedBlockForward:
    """A block's ``forward`` replaced by the shared compiled :func:`_run_block`, with its own :class:`LayerCache`,
    whose shared length it places before the block and advances after it (:class:`LayerCache` says why not
    inside)."""

    def __init__(self, block: nn.Module, index: int) -> None:
        self.block, self.index = block, index

    def __call__(self, *args: object, **kwargs: object) -> object:
        name = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if name is None:
            return _block_code()(self.block, *args, **kwargs)
        hidden_states = args[0] if args else kwargs["hidden_states"]  # [B, new tokens, D]: what the block caches
        cache = kwargs[name] = LayerCache(kwargs[name], self.index)
        cache.place(hidden_states.device)
        out = _block_code()(self.block, *args, **kwargs)
        cache.advance(hidden_states.shape[-2])
        return out


def compiled(model: nn.Module, dynamic: bool) -> Callable:
    """``model`` with the compiler's fusions, ``fullgraph=True`` (a graph break is an error, not a slow path).

    :data:`SCOPE` ``"blocks"``: regional compilation; the embedding, mask and head stay eager, which a CUDA graph
    replays at kernel cost.  Every block's ``forward`` becomes one shared compiled function taking the block as an
    input (:class:`SharedBlockForward`), so the blocks share one compiled code per input kind (prefill, decode
    step, batch), whatever the number of layers, and ``dynamic`` is left to dynamo's automatic dynamic shapes.
    Compiling each block in place (``block.compile()``) did not share: with a KV cache, dynamo specialized each
    block on its layer index (:class:`LayerCache` says where), so a 32-block model compiled 32 decode graphs
    (about as slow as the whole model) and, past ``torch._dynamo.config.recompile_limit`` (8), failed with
    ``FailOnRecompileLimitHit``.  ``"whole"``: the model compiled as one graph (``dynamic`` shapes for prefill),
    as gpt-fast does; several minutes for a 7B model."""
    if SCOPE == "blocks":
        from dgq.models import adapter_for

        for index, block in enumerate(adapter_for(model).blocks(model)):
            if not isinstance(block.__dict__.get("forward"), SharedBlockForward):
                block.forward = SharedBlockForward(block, index)
        return model
    key = (id(model), dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(model, fullgraph=True, dynamic=dynamic, options=COMPILE_OPTIONS)
    return _COMPILED[key]


def causal_mask(batch: int, seqlen: int) -> torch.Tensor:
    """The prefill's attention mask, given explicitly (4-D bool, True = attend) in every mode.

    Without one, transformers drops the mask for SDPA's ``is_causal`` when it runs eagerly but builds one while a
    CUDA graph is being captured (or the model traced), so the captured forward would differ from its warm-up (a
    recompilation inside the capture, which fails) and the modes would time different attention kernels."""
    full = torch.ones(seqlen, seqlen, dtype=torch.bool, device="cuda").tril_()
    return full[None, None].expand(batch, 1, seqlen, seqlen)


@torch.inference_mode()
def prefill(model: nn.Module, batch: int, seqlen: int, vocab: int, repeats: int,
            mode: str = "graph") -> tuple[float, int, int]:
    """Median ms of one forward over ``batch x seqlen`` random tokens (last position's logits only), the peak memory
    from the first call on, and the peak of one prefill once warm.

    The two peaks differ by what only the first calls hold: compilation and autotuning (Triton's autotuner allocates
    a 256 MiB L2-flush buffer per tuning), which a server pays once at warm-up.  The warm peak is what every later
    prefill of this length needs: in ``graph`` mode the peak while the graph is captured (the weights and the graph's
    own memory pool, which its replays reuse without allocating, so a peak taken over replays would miss it);
    otherwise the peak of the timed calls."""
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill mode {mode!r}; choose from {', '.join(PREFILL_MODES)}")
    ids = torch.randint(0, vocab, (batch, seqlen), device="cuda")
    mask = causal_mask(batch, seqlen)
    forward = model if mode == "eager" else compiled(model, dynamic=True)
    step = lambda: forward(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)  # noqa: E731
    torch.cuda.reset_peak_memory_stats()
    if mode == "graph":
        warm_up(step)
        first = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run = capture(step)
        torch.cuda.synchronize()
        warm = torch.cuda.max_memory_allocated()
        ms = timed(run, repeats)
    else:
        step()
        torch.cuda.synchronize()
        first = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = timed(step, repeats)
        warm = torch.cuda.max_memory_allocated()
    return ms, max(first, warm), warm


class DecodeStep:
    """One-token steps after a ``context``-token prefill, with a static KV cache, ready to replay.

    Each call is a real next step: the cache (which counts its length on the GPU) appends one position and the
    step's ``cache_position`` advances with it, inside the captured graph; the input token stays the same.  The
    cache holds ``context + steps`` positions, enough for the warm-up, capture and timed calls of :func:`decode`."""

    def __init__(self, model: nn.Module, batch: int, context: int, vocab: int, mode: str = "compiled",
                 capture: bool = True, steps: int = 64, kv_cache: str = "fp16") -> None:
        from dgq.kv_cache import Int8StaticCache, float_static_cache

        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode {mode!r}; choose from {', '.join(DECODE_MODES)}")
        if kv_cache not in KV_CACHES:
            raise ValueError(f"KV cache {kv_cache!r}; choose from {', '.join(KV_CACHES)}")
        # one length counter for all layers, advanced once per step; int8: the model must use dgq.attention
        cache = Int8StaticCache if kv_cache == "int8" else float_static_cache
        self.cache = cache(config=model.config, max_cache_len=context + steps)
        ids = torch.randint(0, vocab, (batch, context), device="cuda")
        model(ids, past_key_values=self.cache, cache_position=torch.arange(context, device="cuda"),
              logits_to_keep=1)
        self.tok = torch.randint(0, vocab, (batch, 1), device="cuda")
        self.pos = torch.tensor([context], device="cuda")
        self.forward = compiled(model, dynamic=False) if mode == "compiled" else model
        self.run = captured(self.step) if capture else self.step

    def step(self) -> torch.Tensor:
        logits = self.forward(self.tok, past_key_values=self.cache, cache_position=self.pos, use_cache=True).logits
        self.pos.add_(1)
        return logits


@torch.inference_mode()
def decode(model: nn.Module, batch: int, context: int, steps: int, vocab: int,
           mode: str = "compiled", kv_cache: str = "fp16") -> tuple[float, int]:
    """Tokens/s of decode steps (:class:`DecodeStep`, CUDA-graph replays) and the peak memory."""
    torch.cuda.reset_peak_memory_stats()
    step = DecodeStep(model, batch, context, vocab, mode, steps=steps + 16, kv_cache=kv_cache)
    ms = timed(step.run, repeats=steps, warmup=2)
    return batch * 1000.0 / ms, torch.cuda.max_memory_allocated()


# Kernel-name patterns per category, checked in this order (the first match wins).  The activation quantization
# compiled into its producer is counted with the producer: "norm" holds RMSNorm (+ quantization) kernels.
CATEGORIES = (
    ("other", ("_write_rows_int8",)),  # the int8 KV cache's write (dgq.kernels.kv_write), not an int8 GEMM
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("gemm", ("gemm", "gemv", "a8w4", "int8", "cutlass", "xmma", "nvjet", "int4pack", "widen", "matmul", "sm90")),
    ("act_quant", ("act_quant",)),
    ("norm", ("rsqrt",)),
)
# inductor's generated kernels: named after every op of their fused region, consumers included
# ("triton_red_fused__to_copy_a8w4_linear_add_mean_mul_pow_rsqrt" is an RMSNorm whose output feeds a GEMM)
INDUCTOR_PREFIXES = ("triton_poi_", "triton_red_", "triton_per_")


def category(kernel: str) -> str:
    """The category of one kernel.  inductor's kernels are norms (``rsqrt``) or other fused element-wise work,
    whatever else their names mention: a name like ``..._decode_attention_index_copy_...`` is the rotary embedding
    and cache write before the attention, not the attention."""
    name = kernel.lower()
    if name.startswith(INDUCTOR_PREFIXES):
        return "norm" if "rsqrt" in name else "other"
    return next((cat for cat, keys in CATEGORIES if any(k in name for k in keys)), "other")


@torch.inference_mode()
def breakdown(fn: Callable[[], object], repeats: int = 5) -> dict[str, float]:
    """GPU microseconds per call of ``fn`` by kernel category (:data:`CATEGORIES`), from ``torch.profiler``; also
    ``"total"`` (kernel time) and the ``"kernels"`` launched per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    count = 0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            totals[category(event.name)] += event.device_time / repeats
            per_kernel[event.name[:90]] += event.device_time / repeats
            count += 1
    totals["total"] = sum(totals.values())
    totals["kernels"] = count / repeats
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {**totals, "top": {name: round(us, 1) for name, us in top}}
