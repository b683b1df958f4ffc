"""One dgq GEMM call inside a CUDA profiler range, for Nsight Compute (the autotuning runs before the range).

    ncu --profile-from-start off --set full -o prof python benchmarks/profile_gemm.py --k 4096 --n 11008 --m 4096

Prints the config the autotuner picked, so the profile can be tied to the benchmark's row.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.gemm import GROUP, Operands, chosen_config, kernel_call, make_weight


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--kernel", default="dgq_gemm_only")
    args = p.parse_args()
    o = Operands(make_weight(args.n, args.k, GROUP))
    o.set_acts(args.m)
    call = kernel_call(args.kernel, o)
    for _ in range(3):
        call()  # compile and autotune outside the profiled range
    torch.cuda.synchronize()
    cfg = chosen_config(args.kernel, args.m, args.k, args.n)
    print(f"{args.kernel} K={args.k} N={args.n} M={args.m}: config {cfg}", flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
