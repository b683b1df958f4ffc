"""Speed of a model on the local GPU: prefill latency and decode throughput, shared by ``dgq bench`` and
``benchmarks/e2e.py`` so both measure the same way (CUDA events, median after warm-up, CUDA-graph decode)."""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn


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


@torch.inference_mode()
def prefill(model: nn.Module, batch: int, seqlen: int, vocab: int, repeats: int) -> tuple[float, int]:
    """Median ms of one forward over ``batch x seqlen`` random tokens (last position's logits only), and the
    peak memory it reached."""
    ids = torch.randint(0, vocab, (batch, seqlen), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    ms = timed(lambda: model(ids, use_cache=False, logits_to_keep=1), repeats)
    return ms, torch.cuda.max_memory_allocated()


@torch.inference_mode()
def decode(model: nn.Module, batch: int, context: int, steps: int, vocab: int) -> tuple[float, int, str]:
    """Tokens/s of greedy one-token steps after a ``context``-token prefill, with a static KV cache.

    The step is captured once in a CUDA graph and replayed; if capture fails the loop runs eagerly and the
    returned mode says so (the JSON records it, nothing is hidden)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + steps + 8)
    ids = torch.randint(0, vocab, (batch, context), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    model(ids, past_key_values=cache, cache_position=torch.arange(context, device="cuda"), logits_to_keep=1)
    tok = torch.randint(0, vocab, (batch, 1), device="cuda")
    pos = torch.tensor([context], device="cuda")

    def step() -> torch.Tensor:
        out = model(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
        return out

    for _ in range(3):  # warm-up: autotuning and lazy initialisation happen outside the graph
        step()
    torch.cuda.synchronize()
    mode = "cuda_graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    except Exception as exc:  # noqa: BLE001 - the reason is reported in the results
        mode = f"eager ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        torch.cuda.synchronize()
        run = step
    ms = timed(run, repeats=steps, warmup=2)
    return batch * 1000.0 / ms, torch.cuda.max_memory_allocated(), mode
