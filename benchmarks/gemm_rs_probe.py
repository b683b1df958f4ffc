"""Probe: the A8W4 GEMM whose MMA warps widen the weight into the wgmma register operand (:mod:`dgq.kernels.gemm_rs`)
beside the warp-specialized kernel's rule, the dispatch (int8 codes in) and cuBLAS FP16, on the five benchmark shapes,
with the cold-L2 CUDA-graph timing of ``benchmarks/gemm.py``.  Every config is checked bit-exact against
``torch._int_mm`` first (int32 accumulators) and its fp32 epilogue against the warp-specialized kernel's.

    PYTHONPATH=. python benchmarks/gemm_rs_probe.py --json $OUT/rs.json      # the H100
"""

from __future__ import annotations

import argparse
import json

import torch

from dgq.kernels.gemm_rs import rs_a8w4_matmul
from dgq.kernels.gemm_ws import WsConfig as W
from dgq.kernels.gemm_ws import config_for, ws_a8w4_matmul
from dgq.kernels.linear import a8w4_mm

P = dict(persistent=1)
# (config, overlap): overlap widens the next tile while the last tile's MMAs run, without keeping their A registers
# live in the code, so ptxas may overwrite them (it did, session 10: a race); without it each tile's MMAs retire first
CONFIGS = [(W(256, 128, 4, 1, 0, 168, 8, **P), False), (W(256, 128, 4, 1, 0, 168, 8, **P), True),
           (W(128, 256, 4, 1, 0, 168, 8, **P), False), (W(128, 128, 6, 1, 0, 168, 4, **P), False),
           (W(128, 128, 6, 1, 0, 168, 4, **P), True), (W(64, 128, 6, 1, 0, 168, 4), False),
           (W(64, 128, 6, 1, 0, 168, 4), True)]

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--ms", default="256,1024,2048,4096")
    args = parser.parse_args()
    from gemm import SHAPES, operand_sets, print_failures, time_graph

    rows, failures = [], []
    for k, n in SHAPES:
        sets = operand_sets(k, n)
        for m in [int(v) for v in args.ms.split(",")]:
            for o in sets:
                o.set_acts(m)
            o = sets[0]
            pad = torch.zeros(max(m, 32), k, dtype=torch.int8, device="cuda")
            pad[:m] = o.x_s8
            want = torch._int_mm(pad, o.w8.t())[:m]
            times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets]),
                     "dispatch": time_graph([lambda o=o: a8w4_mm(o.x_s8, o.s_x, o.kw) for o in sets]),
                     "ws_rule": time_graph([lambda o=o: ws_a8w4_matmul(o.x_s8, o.kw, o.s_x) for o in sets])}
            ws_out = ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, out_dtype=torch.float32)
            for cfg, ov in CONFIGS:
                try:
                    ok = (torch.equal(rs_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg, overlap=ov), want)
                          and torch.equal(rs_a8w4_matmul(o.x_s8, o.kw, o.s_x, out_dtype=torch.float32, config=cfg,
                                                         overlap=ov),
                                          ws_out))
                except Exception as e:  # noqa: BLE001 - a config that cannot build or launch is reported
                    failures.append(f"K={k} N={n} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                if not ok:
                    failures.append(f"K={k} N={n} M={m} ov={int(ov)} {cfg}: not bit-exact")
                    continue
                times[f"rs ov={int(ov)} {cfg}"] = time_graph(
                    [lambda o=o, c=cfg, v=ov: rs_a8w4_matmul(o.x_s8, o.kw, o.s_x, out_dtype=torch.float16, config=c,
                                                             overlap=v) for o in sets])
            rows += [{"K": k, "N": n, "M": m, "kernel": name, "ms": t} for name, t in times.items()]
            best = min(((t, name) for name, t in times.items() if name.startswith("rs")), default=(float("nan"), "-"))
            print(f"K={k} N={n} M={m}: fp16 {times['fp16'] * 1e3:.1f} dispatch {times['dispatch'] * 1e3:.1f} "
                  f"ws_rule {times['ws_rule'] * 1e3:.1f} ({config_for(m, n)}) best rs {best[0] * 1e3:.1f} {best[1]}",
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"rows": rows, "failures": failures}, f, indent=1)
    print_failures(failures)


if __name__ == "__main__":
    main()
