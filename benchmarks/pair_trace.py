"""Kernel start and end times of the one-token layer (the act-quant, then the TMA GEMV launched early) inside a CUDA
graph replay, from torch.profiler (CUPTI), beside the GEMV from codes alone: when the GEMV starts against the
act-quant, and whether it then runs longer than alone.  (Nsight Systems cannot make a report on the device machine.)

    PYTHONPATH=.:benchmarks python benchmarks/pair_trace.py     # the H100; prints, writes nothing

Session 18 (BENCHMARKS.md, GEMM run 13): the GEMV started 0.6-1.1 us after the act-quant and ran as long as from
codes (28672 x 8192: 45.2-45.6 us against 43.2-45.6; 11008 x 4096: 11.5-11.9 against 11.6-12.3); the act-quant, beside the GEMV's weight stream, took ~7 us.
"""

from __future__ import annotations

import torch
from gemm import operand_sets

from dgq.kernels import linear


def main() -> None:
    for k, n in ((28672, 8192), (8192, 28672), (11008, 4096)):
        sets = operand_sets(k, n)[:3]
        for o in sets:
            o.set_acts(1)
        calls = [lambda o=o: linear.a8w4_linear(o.x16, o.kw) for o in sets] + [
            lambda o=o: linear.a8w4_mm(o.x_s8, o.s_x, o.kw) for o in sets]  # the pairs, then the GEMV from codes
        for c in calls:
            c()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        evs = sorted([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA],
                     key=lambda e: e.time_range.start)
        if not evs:
            print(f"K={k} N={n}: the profiler recorded no kernels")
            continue
        t0 = evs[0].time_range.start
        print(f"K={k} N={n}")
        for e in evs:
            start, end = e.time_range.start - t0, e.time_range.end - t0
            print(f"  {e.name[:40]:40s} start {start:8.1f} end {end:8.1f} us, {end - start:6.1f} us")


if __name__ == "__main__":
    main()
