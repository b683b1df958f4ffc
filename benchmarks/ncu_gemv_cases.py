"""Nsight Compute targets for the one-token TMA GEMV (:mod:`dgq.kernels.gemv_tma`): one pinned config on one shape,
called three times after nothing else, so ``-s 2 -c 1`` profiles the third call (the first two compile and warm):

    ncu --target-processes all -k regex:_tma_gemv_kernel -s 2 -c 1 --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python benchmarks/ncu_gemv_cases.py w70b_inside

Cases: ``<shape>_<how>`` with shape ``w70b`` (8192 x 28672), ``d70b`` (28672 x 8192), ``mlp`` (4096 x 11008) and
how ``inside`` (the rule's config quantizing inside), ``codes`` (the rule's config from int8 codes) or ``kt2`` /
``kt4`` (the inside rule's config with 2 / 4 K tiles per ring slot, a ring of 2 slots at 4).  Session 15's first
profiles (``results/ncu_s15/*tiled*``) ran this script at commit d9f1a29, whose ``tiled`` case read codes stored
tile by tile.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemv_tma import config_for, tma_gemv, tma_gemv_float

SHAPES = {"w70b": (8192, 28672), "d70b": (28672, 8192), "mlp": (4096, 11008)}  # (K, N)


def main() -> None:
    sys.path.insert(0, "benchmarks")
    from gemm import operand_sets  # same operands as the benchmark

    shape, how = sys.argv[1].split("_")
    k, n = SHAPES[shape]
    o = operand_sets(k, n)[0]
    o.set_acts(1)
    cfg = config_for(n, k, inside=how != "codes")
    kw = o.kw
    if how.startswith("kt"):
        kt = int(how[2:])
        cfg = dataclasses.replace(cfg, kt=kt, stages=2 if kt == 4 else cfg.stages)
    q, s = quantize_activations_triton(o.x16)
    for _ in range(3):
        out = tma_gemv(q, kw, s, config=cfg) if how == "codes" else tma_gemv_float(o.x16, kw, config=cfg)
    torch.cuda.synchronize()
    print(sys.argv[1], cfg, float(out.float().abs().sum()))


if __name__ == "__main__":
    main()
