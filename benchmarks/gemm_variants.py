"""Candidate A8W4 kernel paths side by side on one CUDA GPU: the lab bench behind ``benchmarks/notes_gemm.md``.

    PYTHONPATH=. python benchmarks/gemm_variants.py --out $OUT/variants.json

Checks each candidate bit-exact against the production kernels first, then times (CUDA-graph replays over enough
operand sets to defeat the L2, as ``benchmarks/gemm.py`` does) every variant at every (shape, M), prints ms and the
ratio vs FP16, and writes the rows with the configs the autotuners chose.  ``benchmarks/gemm.py`` is the benchmark of
record; this script is for deciding which path ``dgq.kernels.linear`` takes where.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm import SHAPES, TOUCH_BYTES, Operands, shapes_within_budget, time_graph  # noqa: E402

from dgq.kernels import gemm, gemv, int8_gemm  # noqa: E402
from dgq.kernels.act_quant import quantize_activations_triton  # noqa: E402



def variants(o: Operands) -> dict[str, Callable[[], torch.Tensor]]:
    def tc_full() -> torch.Tensor:
        q, s = quantize_activations_triton(o.x16)
        return gemm.a8w4_matmul(q, o.kw, s)

    def gemv_full() -> torch.Tensor:
        q, s = quantize_activations_triton(o.x16)
        return gemv.a8w4_gemv(q, o.kw, s)

    def tma_full() -> torch.Tensor:
        q, s = quantize_activations_triton(o.x16)
        return int8_gemm.int8_matmul(q, gemm.widen_weight(o.kw), s, o.dg.s1)

    return {
        "fp16": lambda: o.x16 @ o.w16.t(),
        "fp8_rowwise": lambda: torch._scaled_mm(o.x_fp8, o.w_fp8.t(), scale_a=o.s_x, scale_b=o.s1_row,
                                                out_dtype=torch.bfloat16),
        "act_quant": lambda: quantize_activations_triton(o.x16),
        "tc_only": lambda: gemm.a8w4_matmul(o.x_s8, o.kw, o.s_x),
        "tc_full": tc_full,
        "gemv_only": lambda: gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x),
        "gemv_full": gemv_full,
        "widen": lambda: gemm.widen_weight(o.kw),
        "tma_only": lambda: int8_gemm.int8_matmul(o.x_s8, o.w8, o.s_x, o.dg.s1),
        "tma_full": tma_full,
    }


SMALL = ["fp16", "fp8_rowwise", "act_quant", "tc_only", "tc_full", "gemv_only", "gemv_full"]
LARGE = ["fp16", "fp8_rowwise", "act_quant", "widen", "tc_only", "tma_only", "tma_full"]


def check(o: Operands, failures: list[str], tag: str) -> None:
    for m in (1, 3, 8, 16):
        o.set_acts(m)
        want = gemm.a8w4_matmul(o.x_s8, o.kw, o.s_x)
        for cfg in gemv.CONFIGS:
            got = gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x, config=cfg)
            if not torch.equal(got, want):
                failures.append(f"{tag} M={m} gemv {cfg}: {(got != want).sum().item()} outputs differ")
    for m in (100, 1024):
        o.set_acts(m)
        acc = gemm.a8w4_matmul(o.x_s8, o.kw, out_dtype=None)  # exact int32 (tests/test_kernels_cuda.py)
        want = acc.float() * o.s_x.float() * o.dg.s1.float()  # the kernels' fp32 epilogue, same order
        for cfg in int8_gemm.CONFIGS:
            got = int8_gemm.int8_matmul(o.x_s8, o.w8, o.s_x, o.dg.s1, out_dtype=torch.float32, config=cfg)
            if not torch.equal(got, want):
                failures.append(f"{tag} M={m} int8 {cfg}: {(got != want).sum().item()} outputs differ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    p.add_argument("--small-ms", default="1,16")
    p.add_argument("--large-ms", default="64,256,1024,4096")
    p.add_argument("--budget-s", type=float, default=480)
    args = p.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    t0 = time.time()
    failures: list[str] = []
    rows: list[dict] = []
    for k, n, sets in shapes_within_budget(shapes, t0, args.budget_s):
        n_sets = len(sets)
        check(sets[0], failures, f"K={k} N={n}")
        print(f"checked K={k} N={n} ({time.time() - t0:.0f} s); failures so far: {len(failures)}", flush=True)
        for regime, ms in (("small", args.small_ms), ("large", args.large_ms)):
            for m in map(int, ms.split(",")):
                for o in sets:
                    o.set_acts(m)
                line = []
                for name in SMALL if regime == "small" else LARGE:
                    base = name
                    per_call = 0.5 * n * k if base not in ("fp16", "fp8_rowwise", "tma_only") else 2.0 * n * k
                    use = sets[:min(n_sets, max(2, math.ceil(TOUCH_BYTES / per_call)))]
                    try:
                        t = time_graph([variants(o)[base] for o in use])
                    except Exception as e:  # recorded, not hidden
                        print(f"  {name} K={k} N={n} M={m}: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
                        continue
                    row = {"K": k, "N": n, "M": m, "kernel": name, "ms": t}
                    if base.startswith("gemv"):
                        row["config"] = str(gemv._tuned.best_config)
                    elif base.startswith("tma"):
                        row["config"] = str(int8_gemm._tuned.best_config)
                    elif base.startswith("tc"):
                        row["config"] = str(gemm._tuned.best_config)
                    rows.append(row)
                    line.append(f"{name}={t:.4f}")
                print(f"K={k} N={n} M={m}: " + " ".join(line), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=0))
        del sets
        torch.cuda.empty_cache()
    report(rows)
    print(f"total {time.time() - t0:.0f} s")
    print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures[:20]) if failures else "correctness: all checks passed")


def report(rows: list[dict]) -> None:
    t = {(r["K"], r["N"], r["M"], r["kernel"]): r["ms"] for r in rows}
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    ms = sorted({r["M"] for r in rows})
    print("median over shapes of speed-up vs fp16 (time ratio fp16 / variant)")
    print("M | " + " | ".join(names))
    for m in ms:
        cells = []
        for name in names:
            r = [t[(k, n, mm, "fp16")] / v for (k, n, mm, nm), v in t.items() if mm == m and nm == name
                 and (k, n, m, "fp16") in t]
            cells.append(f"{statistics.median(r):.2f}" if r else "-")
        print(f"{m} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
