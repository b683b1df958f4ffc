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

import statistics
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

DECODE_MODES = ("compiled", "graph")
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


def captured(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` (no arguments, fixed input tensors) captured in a CUDA graph; returns the replay.  Warm-up calls run
    first, outside the graph: autotuning, compilation and lazy allocations happen there."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


_COMPILED: dict[tuple[int, bool], Callable] = {}  # (id(model), dynamic) -> compiled model, built once per process
SCOPES = ("blocks", "whole")
SCOPE = "blocks"  # what :func:`compiled` compiles (benchmarks/e2e.py --compile-scope measures both)


def compiled(model: nn.Module, dynamic: bool) -> Callable:
    """``model`` with the compiler's fusions, ``fullgraph=True`` (a graph break is an error, not a slow path).

    :data:`SCOPE` ``"blocks"``: each decoder block compiled in place (regional compilation: the blocks share one
    compiled code, so a 32-block model compiles about as fast as one block); the embedding, mask and head stay
    eager, which a CUDA graph replays at kernel cost.  ``"whole"``: the model compiled as one graph (``dynamic``
    shapes for prefill), as gpt-fast does; several minutes for a 7B model."""
    if SCOPE == "blocks":
        from dgq.models import adapter_for

        for block in adapter_for(model).blocks(model):
            if not getattr(block, "_compiled_call_impl", None):
                block.compile(fullgraph=True)
        return model
    key = (id(model), dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(model, fullgraph=True, dynamic=dynamic)
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
            mode: str = "graph") -> tuple[float, int]:
    """Median ms of one forward over ``batch x seqlen`` random tokens (last position's logits only), and the
    peak memory it reached."""
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill mode {mode!r}; choose from {', '.join(PREFILL_MODES)}")
    ids = torch.randint(0, vocab, (batch, seqlen), device="cuda")
    mask = causal_mask(batch, seqlen)
    forward = model if mode == "eager" else compiled(model, dynamic=True)
    step = lambda: forward(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)  # noqa: E731
    torch.cuda.reset_peak_memory_stats()
    run = captured(step) if mode == "graph" else step
    ms = timed(run, repeats)
    return ms, torch.cuda.max_memory_allocated()


class DecodeStep:
    """One-token steps after a ``context``-token prefill, with a static KV cache, ready to replay.

    Each call is a real next step: the cache (which counts its length on the GPU) appends one position and the
    step's ``cache_position`` advances with it, inside the captured graph; the input token stays the same.  The
    cache holds ``context + steps`` positions, enough for the warm-up, capture and timed calls of :func:`decode`."""

    def __init__(self, model: nn.Module, batch: int, context: int, vocab: int, mode: str = "compiled",
                 capture: bool = True, steps: int = 64) -> None:
        from transformers import StaticCache

        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode {mode!r}; choose from {', '.join(DECODE_MODES)}")
        self.cache = StaticCache(config=model.config, max_cache_len=context + steps)
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
           mode: str = "compiled") -> tuple[float, int]:
    """Tokens/s of decode steps (:class:`DecodeStep`, CUDA-graph replays) and the peak memory."""
    torch.cuda.reset_peak_memory_stats()
    step = DecodeStep(model, batch, context, vocab, mode, steps=steps + 16)
    ms = timed(step.run, repeats=steps, warmup=2)
    return batch * 1000.0 / ms, torch.cuda.max_memory_allocated()


# Kernel-name patterns per category, checked in this order (the first match wins).  The activation quantization
# compiled into its producer is counted with the producer: "norm" holds RMSNorm (+ quantization) kernels.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("gemm", ("gemm", "gemv", "a8w4", "int8", "cutlass", "xmma", "nvjet", "int4pack", "widen", "matmul", "sm90")),
    ("act_quant", ("act_quant",)),
    ("norm", ("rsqrt",)),
)


def category(kernel: str) -> str:
    name = kernel.lower()
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
