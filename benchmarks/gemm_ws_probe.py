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

from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import a8w4_matmul, widen_weight
from dgq.kernels.gemm_ws import WsConfig, config_for, ws_a8w4_matmul
from dgq.kernels.int8_gemm import int8_matmul
from dgq.kernels.linear import a8w4_linear, a8w4_mm, widen_once_matmul

# (bn, bm, stages, split, widen_regs, maxnreg) around the rule: ring depth (bytes in flight), K splits (per-tile
# arrival), 64/128-row tiles, 1-2 CTAs per SM (maxnreg 80: two fit).
W = WsConfig
# Session 10 also measured persistent grids and 256-token tiles with two MMA warpgroups here (the rule from then to
# session 16: results/gemm_ws_probe_h100_s10_*.json); session 16's ping-pong kernel (benchmarks/gemm_pp_probe.py)
# took those regimes and the kernel lost both forms (code at a174f4e).  Dropped before: 256-row tiles, two CTAs per
# SM with 64-token tiles, K splits at M = 256, eight widening warps.
# the act-quant + GEMM pair per M: the rule's configs and their neighbours in registers (1 or 2 CTAs per SM)
PAIR_CONFIGS = {16: [W(64, 16, 6, s, 80, 80) for s in (1, 2, 4)] + [W(128, 16, 4, s, 80, 80) for s in (1, 2)],
                # decode at batch 17-32: 32-token tiles, more K splits, two CTAs per SM
                32: [W(128, 64, 4, s) for s in (1, 2, 4)] + [W(64, 32, 6, s, 80, 80) for s in (1, 2, 4)]
                + [W(128, 32, 4, s, 80, 80) for s in (1, 2)] + [W(64, 64, 6, s, 80, 80) for s in (2, 4)],
                64: [W(128, 64, 4, 1), W(128, 64, 4, 1, 80, 80), W(128, 64, 4, 2), W(128, 64, 4, 2, 80, 80),
                     W(64, 64, 6, 1, 80, 80), W(64, 64, 6, 2, 80, 80)],
                8192: [W(64, 128, 6, 1), W(128, 128, 6, 1, 128), W(64, 256, 4, 1)]}
CANDIDATES = {16: [W(64, 16, st, s, 80, 80) for st in (6, 10) for s in (1, 2, 4)]
              + [W(128, 16, st, s, 80, 80) for st in (4, 6) for s in (1, 2)]
              + [W(128, 16, 6, s) for s in (1, 2, 3)] + [W(64, 16, 10, s) for s in (1, 2)],
              64: [W(64, 64, st, s, 80, 80) for st in (6, 8) for s in (1, 2, 4)]
              + [W(128, 64, st, s) for st in (4, 6) for s in (1, 2)] + [W(128, 64, 4, s, 80, 80) for s in (1, 2)],
              # beyond M = 64 the layers too narrow for the ping-pong kernel (against widen-once past MAX_M)
              8192: [W(64, 128, 6, 1), W(128, 128, 6, 1, 128), W(64, 128, 6, 1, 96, 128, widen_warps=8)]}


def measure(json_path: str | None, ms: list[int], shapes: list[tuple[int, int]]) -> None:
    from gemm import (  # benchmarks/gemm.py: same operands and timing method
        print_failures,
        save_probe,
        sets_at,
        time_graph,
    )

    rows, failures = [], []
    for k, n, m, sets in sets_at(shapes, ms):
        o = sets[0]
        pad = torch.zeros(max(m, 32), k, dtype=torch.int8, device="cuda")
        pad[:m] = o.x_s8
        want = torch._int_mm(pad, o.w8.t())[:m]
        rule = config_for(m, n)
        cands = dict.fromkeys([rule, *CANDIDATES[next(r for r in sorted(CANDIDATES) if m <= r)]])
        times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets]),
                 "in_register": time_graph([lambda o=o: a8w4_matmul(o.x_s8, o.kw, o.s_x) for o in sets]),
                 "dgq_path": time_graph([lambda o=o: a8w4_mm(o.x_s8, o.s_x, o.kw) for o in sets])}
        for cfg in cands:
            if not torch.equal(ws_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg), want):
                failures.append(f"K={k} N={n} M={m} {cfg}")
                continue
            times[str(cfg)] = time_graph([lambda o=o, c=cfg: ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=c)
                                          for o in sets])
            # again after the graph's replays: split-K's per-tile counts must have been left at zero each time
            if not torch.equal(ws_a8w4_matmul(o.x_s8, o.kw, out_dtype=None, config=cfg), want):
                failures.append(f"K={k} N={n} M={m} {cfg} after replays")
        rows += [{"K": k, "N": n, "M": m, "kernel": name, "ms": t, "rule": name == str(rule)}
                 for name, t in times.items()]
        best = min((t, name) for name, t in times.items() if name.startswith("WsConfig"))
        print(f"K={k} N={n} M={m}: fp16 {times['fp16']:.4f}, in-register {times['in_register']:.4f}, dispatch "
              f"{times['dgq_path']:.4f}, rule "
              f"{times[str(rule)]:.4f} ({times['fp16'] / times[str(rule)]:.2f}x), best {best[0]:.4f} {best[1]}",
              flush=True)
        save_probe(json_path, rows, failures)
    print_failures(failures)


def pairs(json_path: str | None, ms: list[int], shapes: list[tuple[int, int]]) -> None:
    """The act-quant + GEMM pair as ``QuantLinear`` runs it (float activations in), per config of
    :data:`PAIR_CONFIGS`, with programmatic dependent launch on and off, beside the act-quant and the GEMM alone:
    where the pair loses more than the act-quant's own time, the two kernels slow each other down."""
    from gemm import sets_at, time_graph

    rows = []
    for k, n, m, sets in sets_at(shapes, ms):
        times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets]),
                 "act_quant": time_graph([lambda o=o: quantize_activations_triton(o.x16) for o in sets])}
        if m > 256:  # the widen-once path's parts, and the whole QuantLinear forward with PDL on and off
            w8 = [widen_weight(o.kw) for o in sets]
            times["widen"] = time_graph([lambda o=o: widen_weight(o.kw) for o in sets])
            times["int8_ready"] = time_graph([lambda o=o, w=w: int8_matmul(o.x_s8, w, o.s_x, o.kw.s1)
                                              for o, w in zip(sets, w8)])
            times["dispatch_codes_in"] = time_graph([lambda o=o: a8w4_mm(o.x_s8, o.s_x, o.kw) for o in sets])
            times["widen_once_unchunked"] = time_graph([lambda o=o: widen_once_matmul(o.x_s8, o.s_x, o.kw,
                                                                                      chunk_bytes=1 << 62)
                                                        for o in sets])
            del w8
            for pdl in (True, False):
                times[f"linear pdl={int(pdl)}"] = _timed_with_pdl(pdl, [lambda o=o: a8w4_linear(o.x16, o.kw)
                                                                        for o in sets])
        regime = next(r for r in sorted(PAIR_CONFIGS) if m <= r)
        for cfg in dict.fromkeys([config_for(m, n), *PAIR_CONFIGS[regime]]):
            try:  # a config the kernel cannot build (shared memory, tile shapes) is reported, not fatal
                ok = torch.equal(_pair(sets[0], cfg), a8w4_linear(sets[0].x16, sets[0].kw))
            except Exception as e:  # noqa: BLE001
                ok, failed = False, f"{type(e).__name__}: {str(e)[:80]}"
            else:
                failed = "not equal to the dispatch"
            if not ok:
                print(f"  K={k} N={n} M={m} {cfg}: {failed}", flush=True)
                continue
            times[f"gemm {cfg}"] = time_graph([lambda o=o, c=cfg: ws_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=c)
                                               for o in sets])
            for pdl in (True, False):
                times[f"pair pdl={int(pdl)} {cfg}"] = _timed_with_pdl(pdl, [lambda o=o, c=cfg: _pair(o, c)
                                                                            for o in sets])
        rows += [{"K": k, "N": n, "M": m, "kernel": name, "ms": t} for name, t in times.items()]
        print(f"K={k} N={n} M={m}: " + ", ".join(f"{name} {t * 1e3:.1f}" for name, t in times.items()) + " (us)",
              flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump({"rows": rows}, f, indent=1)


def _timed_with_pdl(pdl: bool, calls: list) -> float:
    """``time_graph(calls)`` with programmatic dependent launch on or off (:data:`dgq.kernels.pdl.ENABLED`),
    restored after."""
    from gemm import time_graph

    from dgq.kernels import pdl as launch

    saved, launch.ENABLED = launch.ENABLED, pdl
    try:
        return time_graph(calls)
    finally:
        launch.ENABLED = saved


def _pair(o, cfg: WsConfig) -> torch.Tensor:
    x_s8, s_x = quantize_activations_triton(o.x16)
    return ws_a8w4_matmul(x_s8, o.kw, s_x, config=cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the rows here as they come")
    parser.add_argument("--ms", default="16,64,256", help="token counts, comma-separated (each <= 8192)")
    parser.add_argument("--pairs", action="store_true",
                        help="time the act-quant + GEMM pair per config instead (above M = 256 also the widen-once "
                             "parts)")
    parser.add_argument("--shapes", default="gemm", choices=("gemm", "decode"),
                        help="benchmarks/gemm.py's five shapes, or the decode step's fused layers "
                             "(gemv_probe.DECODE_SHAPES: Llama-2-7B and Llama-3-8B)")
    args = parser.parse_args()
    from gemm import SHAPES
    from gemv_probe import DECODE_SHAPES

    shapes = SHAPES if args.shapes == "gemm" else DECODE_SHAPES
    (pairs if args.pairs else measure)(args.json, [int(m) for m in args.ms.split(",")], shapes)


if __name__ == "__main__":
    main()
