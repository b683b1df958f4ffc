"""Nsight Compute targets for the warp-specialized and ping-pong kernels: one pinned config on one shape, called after
warm-up, so ``-s 2 -c 1`` (skip the warm-up launches) profiles one call (``-k regex:_pp_a8w4_kernel`` for the
``pp_*`` cases, session 16).  The cases of BENCHMARKS.md "Where the time goes at
M >= 256" (session 10):

    ncu --target-processes all -k regex:_ws_a8w4_kernel -s 2 -c 1 --section SpeedOfLight --section WarpStateStats \\
        --section SourceCounters -o $OUT/rep_m256 python benchmarks/ncu_ws_cases.py m256
    ncu -i $OUT/rep_m256.ncu-rep --page source --csv --print-source sass > $OUT/sass_m256.csv
"""

from __future__ import annotations

import sys

import torch

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import widen_weight
from dgq.kernels.gemm_pp import PpConfig, pp_a8w4_matmul
from dgq.kernels.gemm_ws import WsConfig as W
from dgq.kernels.gemm_ws import ws_a8w4_matmul
from dgq.kernels.int8_gemm import int8_matmul

CASES = {  # name: (M, K, N, config)
    "m256": (256, 4096, 4096, W(64, 128, 6, 1)),
    "m256w8": (256, 4096, 4096, W(64, 128, 6, 1, 96, 128, widen_warps=8)),
    "m1024": (1024, 4096, 4096, W(128, 128, 6, 1, 128)),  # session 10 profiled its 256-token tiles (code at a174f4e)
    "m4096_int8": (4096, 4096, 11008, None),  # widen-once's int8 GEMM on the widened weight (-k _int8_gemm_kernel)
    "pp_m1024": (1024, 4096, 4096, PpConfig(256, 4)),
    "pp_m256": (256, 4096, 11008, PpConfig(256, 4)),
    "sc_m256": (256, 4096, 4096, PpConfig(256, 4, 4)),  # K split in 4, reduced by all splits at once (session 17)
    "sc11008_m256": (256, 11008, 4096, PpConfig(128, 6, 2)),  # the rule's config on M = 256's median shape (s18)
    # the act-quant alone, its rule's kernel (-k regex:_act_quant): the rows of M = 256 and one long row (session 18)
    "aq_m256_k11008": (256, 11008, 4096, "act_quant"),
    "aq_m256_k28672": (256, 28672, 8192, "act_quant"),
    "aq_m1_k28672": (1, 28672, 8192, "act_quant"),
}


def main() -> None:
    sys.path.insert(0, "benchmarks")
    from gemm import operand_sets  # same operands as the benchmark

    m, k, n, cfg = CASES[sys.argv[1]]
    o = operand_sets(k, n)[0]
    o.set_acts(m)
    w8 = widen_weight(o.kw) if cfg is None else None  # (the act-quant cases build weights they do not use)
    for _ in range(3):
        if cfg == "act_quant":
            quantize_activations_triton(o.x16)
        elif cfg is None:
            int8_matmul(o.x_s8, w8, o.s_x, o.kw.s1)
        elif isinstance(cfg, PpConfig):
            pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=cfg)
        else:
            ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=cfg)
    torch.cuda.synchronize()
    print(m, k, n, cfg, flush=True)


if __name__ == "__main__":
    main()
