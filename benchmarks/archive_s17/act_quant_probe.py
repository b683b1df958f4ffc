"""The activation quantization alone: the rule's block and warps (:func:`dgq.kernels.act_quant.row_block`) against
other chunk sizes and warp counts, in GB/s of its fewest bytes (fp16 in, int8 codes out, one read).

Why: at M >= 1024 the act-quant is most of what separates ``dgq`` from the GEMM it feeds (BENCHMARKS.md, run 4), and
ncu showed it far from the copy bandwidth (M = 1024, K = 11008: 27.9 us, DRAM 26%, 0.86 waves of 4-warp programs).
Every variant is checked bit-exact against the rule's output first.  Timing as ``benchmarks/gemm.py`` (cold-L2 CUDA
graph over enough row sets to touch >= 256 MB).

``--swiglu``: the same for a fused MLP's down projection, whose quantizer forms ``silu(gate) * up`` from the gate/up
output ``[M, 2K]`` as it reads (``quantize_activations_triton(..., swiglu=True)``).  In chunks (the rule for K >
4096) each row is read, and its product formed, twice; a whole row in registers reads and forms it once.  Prediction
(session 11): whole rows win at K = 11008-14336 with SwiGLU, where chunks won without it; the fewest
bytes are then 4 + 1 per element (fp16 gate and up in, int8 out).  Measured in session 12
(``results/act_quant_swiglu_h100_s12.json``, whole rows by 32 warps added): wrong at K = 11008, where the rule's
chunks stay fastest at M >= 1024 (M = 2048: 69.3 us against 72.7 for the whole row by 16 warps); right at K = 14336
(83.2 -> 76.8 us).

``--segments`` (session 17): the rule against rows split into segments over programs of their own, in two launches
(:func:`dgq.kernels.act_quant.quantize_split_rows`: every segment's absmax, then the codes).  Why: at M = 256 one
program per row keeps one 8 KB chunk of its row in flight, and the act-quant took 5.6 us of the GEMM pair at K =
11008 and 17 us at K = 28672 (BENCHMARKS.md, run 11).  Prediction: >= 2.5 TB/s where M x K / segment gives several
thousand programs, 1.5-2x the rule at M <= 512 on K >= 11008, nothing at K = 4096 (one read already).

    PYTHONPATH=.:benchmarks python benchmarks/act_quant_probe.py --json $OUT/act_quant.json     # the H100
    PYTHONPATH=.:benchmarks python benchmarks/act_quant_probe.py --swiglu --ks 11008,14336 --ms 64,256,1024,2048 \
        --json $OUT/act_quant_swiglu.json
"""

from __future__ import annotations

import argparse
import math

import torch
import triton

from dgq.kernels import act_quant
from dgq.kernels.act_quant import quantize_activations_triton


def _run(x: torch.Tensor, block: int, warps: int, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape[0], x.shape[1] // (2 if swiglu else 1)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    act_quant._act_quant_kernel[(m,)](x, q, s, x.stride(0), q.stride(0), K=k, DYNAMIC=True, STATIC_ROWS=0,
                                      BLOCK=block, ON_GPU=x.is_cuda, SWIGLU=swiglu, num_warps=warps)
    return q, s


def _run_split(x: torch.Tensor, seg: int, warps: int, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape[0], x.shape[1] // (2 if swiglu else 1)
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    act_quant.quantize_split_rows(x, q, s, k, seg, warps, swiglu)
    return q, s


def main() -> None:
    from gemm import (  # benchmarks/gemm.py: the same timing method
        print_failures,
        save_probe,
        time_graph,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--ms", default="256,1024,4096")
    p.add_argument("--ks", default="4096,11008,28672")
    p.add_argument("--swiglu", action="store_true", help="rows of a fused gate/up output, 2K wide (module docstring)")
    p.add_argument("--segments", action="store_true", help="the rule against split rows (module docstring)")
    args = p.parse_args()
    rows, failures = [], []
    width = 2 if args.swiglu else 1
    for k in map(int, args.ks.split(",")):
        for m in map(int, args.ms.split(",")):
            sets = [torch.randn(m, width * k, device="cuda", dtype=torch.float16)
                    for _ in range(max(2, math.ceil(256e6 / ((2 * width + 1) * m * k))))]
            want = quantize_activations_triton(sets[0], swiglu=args.swiglu)
            fewest = (2 * width + 1) * m * k  # bytes: fp16 in (gate and up with --swiglu), int8 out
            rule = (act_quant.row_block(k), act_quant._warps(m, k, act_quant.row_block(k)))
            if args.segments:  # ("seg", segment, warps): split rows
                variants = dict.fromkeys([rule] + [("seg", g, w) for g in (1024, 2048, 4096) for w in (4, 8)])
            else:
                variants = dict.fromkeys([rule] + [(b, w) for b in (2048, 4096, 8192, triton.next_power_of_2(k))
                                                   for w in (4, 8, 16)] + [(triton.next_power_of_2(k), 32)])
            line = []
            for v in variants:
                run = (lambda x, v=v: _run_split(x, v[1], v[2], args.swiglu)) if v[0] == "seg" else \
                    (lambda x, v=v: _run(x, v[0], v[1], args.swiglu))
                block, warps = v[-2:]
                got = run(sets[0])
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    failures.append(f"M={m} K={k} block={block} warps={warps}")
                    continue
                t = time_graph([lambda x=x, r=run: r(x) for x in sets])
                split = v[0] == "seg"
                rows.append({"M": m, "K": k, "block": block, "warps": warps, "ms": t, "rule": v == rule,
                             "swiglu": args.swiglu, "split_rows": split})
                line.append(f"{'seg' if split else ''}{block}/{warps}w {t * 1e3:.1f} us ({fewest / t / 1e6:.0f} GB/s)"
                            + (" rule" if v == rule else ""))
            print(f"M={m} K={k}: " + ", ".join(line), flush=True)
            save_probe(args.json, rows, failures)
    print_failures(failures)


if __name__ == "__main__":
    main()
