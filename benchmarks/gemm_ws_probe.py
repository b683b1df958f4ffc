"""Config search for the warp-specialized A8W4 GEMM (:mod:`dgq.kernels.gemm_ws`): candidates per M regime, side by
side with the rule's pick, cuBLAS FP16 and the in-register kernel, on the shapes and with the cold-L2 CUDA-graph
timing of ``benchmarks/gemm.py``.  Every candidate is checked bit-exact against ``torch._int_mm`` first.

How :func:`dgq.kernels.gemm_ws.config_for` was chosen (benchmarks/notes_gemm.md, "WS" runs); run it again when the
kernel changes:

    PYTHONPATH=. python benchmarks/gemm_ws_probe.py --json $OUT/ws.json     # the H100
"""

from __future__ import annotations

import argparse
import json

import torch

from dgq.kernels.gemm import a8w4_matmul
from dgq.kernels.gemm_ws import WsConfig, config_for, ws_a8w4_matmul

# (bn, bm, stages, split, widen_regs, maxnreg) around the rule: ring depth, K splits, 64/128-row tiles, 1-2 CTAs/SM.
CANDIDATES = {16: [WsConfig(64, 16, 6, s, 80, 80) for s in (1, 2, 3)] + [WsConfig(128, 16, 4, s, 80, 80)
                                                                        for s in (1, 2)] + [WsConfig(128, 16, 6, 2)],
              64: [WsConfig(64, 64, 6, s) for s in (1, 2)] + [WsConfig(128, 64, 4, s) for s in (1, 2)],
              1023: [WsConfig(128, 128, 4, s, 128) for s in (1, 2)] + [WsConfig(64, 128, 4, 2)]}


def measure(json_path: str | None, ms: list[int]) -> None:
    from gemm import (  # benchmarks/gemm.py: same operands and timing method
        SHAPES,
        operand_sets,
        time_graph,
    )

    rows, failures = [], []
    for k, n in SHAPES:
        sets = operand_sets(k, n)
        for m in ms:
            for o in sets:
                o.set_acts(m)
            o = sets[0]
            pad = torch.zeros(max(m, 32), k, dtype=torch.int8, device="cuda")
            pad[:m] = o.x_s8
            want = torch._int_mm(pad, o.w8.t())[:m]
            rule = config_for(m, n)
            cands = dict.fromkeys([rule, *CANDIDATES[next(r for r in sorted(CANDIDATES) if m <= r)]])
            times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets]),
                     "in_register": time_graph([lambda o=o: a8w4_matmul(o.x_s8, o.kw, o.s_x) for o in sets])}
            for cfg in cands:
                if not torch.equal(ws_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg), want):
                    failures.append(f"K={k} N={n} M={m} {cfg}")
                    continue
                times[str(cfg)] = time_graph([lambda o=o, c=cfg: ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=c)
                                              for o in sets])
            rows += [{"K": k, "N": n, "M": m, "kernel": name, "ms": t, "rule": name == str(rule)}
                     for name, t in times.items()]
            best = min((t, name) for name, t in times.items() if name.startswith("WsConfig"))
            print(f"K={k} N={n} M={m}: fp16 {times['fp16']:.4f}, in-register {times['in_register']:.4f}, rule "
                  f"{times[str(rule)]:.4f} ({times['fp16'] / times[str(rule)]:.2f}x), best {best[0]:.4f} {best[1]}",
                  flush=True)
            if json_path:
                with open(json_path, "w") as f:
                    json.dump({"rows": rows, "failures": failures}, f, indent=1)
    print(f"{len(failures)} failures", *failures, sep="\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the rows here as they come")
    parser.add_argument("--ms", default="16,64,256", help="token counts, comma-separated (each <= 1023)")
    args = parser.parse_args()
    measure(args.json, [int(m) for m in args.ms.split(",")])


if __name__ == "__main__":
    main()
