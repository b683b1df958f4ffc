"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched while the one before it in the stream
still runs, which waits for that grid inside (``griddepcontrol.wait``, Triton's ``gdc_wait``) before it reads what
the grid wrote.

Why: a decode step is a chain of small kernels, each paying its launch and ramp-up in turn.  Launched dependent,
a kernel's programs are resident when its producer ends, and a GEMM or GEMV requests its weight tiles (which no
earlier kernel writes) before it waits.  A producer that calls ``gdc_launch_dependents`` lets its consumer launch
from then on; one that does not, from its end.  Every dgq kernel launched with :func:`launch_options` waits before
its first read of a producer's output, so the launch changes timing only, never a result.  The compiled model's
own kernels take part through inductor's ``triton.enable_pdl`` (:data:`dgq.bench.COMPILE_OPTIONS`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ENABLED = True  # benchmarks/gemm_ws_probe.py measures it off and on


def launch_options(device: torch.device) -> dict:
    """Triton launch options for a kernel that waits for its producer inside: PDL on CUDA, nothing elsewhere
    (the CPU interpreter has no such launch)."""
    return {"launch_pdl": True} if ENABLED and device.type == "cuda" else {}


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """The start of a kernel launched with :func:`launch_options` that both consumes its producer's output and
    feeds a kernel launched the same way (the act-quant, the decode attention's split and merge): wait for the
    producer's grid, then let the consumer launch (a GEMM or GEMV after it requests its weight tiles while this one
    runs).  One instruction each; ``PDL`` off (the CPU interpreter, which has neither) compiles to nothing.

    Releasing the consumer right away, not once the act-quant has read its rows, measured faster in 7 of 10 cases
    (the five benchmark layers at 1 and 256 tokens; ``benchmarks/act_quant_probe.py --pairs`` at commit 9c2c87c,
    ``results/act_quant_release_s18.json``: 11008 x 4096, one token, 12.5 against 13.2 us; without PDL 15.1)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
