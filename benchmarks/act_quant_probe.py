"""The activation quantization alone: the rule (:func:`dgq.kernels.act_quant.config_for`) against its variants
(the row whole in registers by 4-32 warps, two chunked passes; the division's fast path or IEEE division), in GB/s
of its fewest bytes (fp16 in, int8 codes out, one read).

Why: the act-quant is a launch of its own in front of every layer's GEMM, and at M = 256 it was what kept ``dgq``
under FP8 row-wise (BENCHMARKS.md, run 11: 5.6 us at K = 11008, 17 us at K = 28672).  Every variant is checked
bit-exact against the rule's output, and the rule against the CPU definition (:func:`dgq.formats.quantize_activations`;
torch's own CUDA division differs from it).  Timing as ``benchmarks/gemm.py`` (cold-L2 CUDA graph over enough row
sets to touch >= 256 MB, at most 4000 sets).

``--swiglu``: the same for a fused MLP's down projection, whose quantizer forms ``silu(gate) * up`` from the gate/up
output ``[M, 2K]`` as it reads (``quantize_activations_triton(..., swiglu=True)``); in chunks each row is read, and
its product formed, twice.  Session 18 (``results/act_quant_swiglu_s18.json``): the row in registers won at every M
measured (M = 2048, K = 11008: 45.6 against 59.3 us).

``--pairs``: the act-quant in front of its layer's GEMM or GEMV, launched early or not (:func:`release_pairs`).

    PYTHONPATH=.:benchmarks python benchmarks/act_quant_probe.py --ms 1,64,256,1024 --json $OUT/act_quant.json
    PYTHONPATH=.:benchmarks python benchmarks/act_quant_probe.py --swiglu --ks 11008,14336 --ms 64,256,1024,2048 \
        --json $OUT/act_quant_swiglu.json
    PYTHONPATH=.:benchmarks python benchmarks/act_quant_probe.py --pairs --ms 1,256 --json $OUT/act_quant_pairs.json
"""

from __future__ import annotations

import argparse
import math

import torch

from dgq.kernels import act_quant
from dgq.formats import quantize_activations
from dgq.kernels.act_quant import quantize_activations_triton


def _run(x: torch.Tensor, variant: tuple, swiglu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of ``variant`` = (whole row in registers, warps, the GPU's division fast path)."""
    return quantize_activations_triton(x, swiglu=swiglu, config=act_quant.AqConfig(*variant))


def _name(variant: tuple) -> str:
    regs, warps, fast = variant
    return f"{'regs' if regs else 'chunks'}/{warps}w/{'fast' if fast else 'div'}"


def _variants(m: int, k: int, swiglu: bool) -> list[tuple]:
    """The rule, chunks by 16 warps with IEEE division (session 12's rule for K > 4096; at K <= 4096 it held the row
    whole) and with the division's fast path, the row in registers by 4-32 warps
    (:func:`dgq.kernels.act_quant.row_pieces`), and by 16 with IEEE division."""
    return list(dict.fromkeys([_rule(m, k, swiglu), (False, 16, False), (False, 16, True)]
                              + [(True, w, True) for w in (4, 8, 16, 32)] + [(True, 16, False)]))


def _rule(m: int, k: int, swiglu: bool) -> tuple:
    return tuple(act_quant.config_for(m, k, swiglu))


def release_pairs(json_path: str | None, ms: list[int]) -> None:
    """The act-quant in front of its layer's GEMM or GEMV (``dgq.kernels.linear.a8w4_linear``) on the benchmark's
    shapes, its consumer launched early (programmatic dependent launch) or not (``dgq.kernels.pdl.ENABLED`` off),
    beside the GEMM from codes alone: how much of the act-quant the early launch hides.  Outputs checked equal.
    (At commit 9c2c87c it also released the consumer once the rows were read:
    ``results/act_quant_release_s18.json``; at 25bf20a it shared a row's codes among 4 or 8 programs, each reading
    the row for the absmax: ``results/act_quant_segments*_s18.json``.)"""
    from gemm import SHAPES, print_failures, save_probe, sets_at, time_graph

    from dgq.kernels import linear, pdl

    def under(pdl_on: bool):
        def call(o):
            saved, pdl.ENABLED = pdl.ENABLED, pdl_on
            try:
                return linear.a8w4_linear(o.x16, o.kw)
            finally:
                pdl.ENABLED = saved
        return call

    calls = {"rule": under(True), "no_pdl": under(False),
             "codes_alone": lambda o: linear.a8w4_mm(o.x_s8, o.s_x, o.kw)}
    rows, failures = [], []
    for k, n, m, sets in sets_at(SHAPES, ms):
        want = linear.a8w4_linear(sets[0].x16, sets[0].kw)
        exact = {name: name == "codes_alone" or torch.equal(fn(sets[0]), want)  # (codes_alone's codes are torch's)
                 for name, fn in calls.items()}
        failures += [f"K={k} N={n} M={m} {name}" for name, ok in exact.items() if not ok]
        times = {}
        for order in (list(calls), list(calls)[::-1]):  # two rounds, the second reversed: the first timing of a
            for name in order:  # shape ran up to 8 us slow in session 18; each call's faster round is kept
                if exact[name]:
                    t = time_graph([lambda o=o, fn=calls[name]: fn(o) for o in sets])
                    times[name] = min(t, times.get(name, t))
        rows += [{"K": k, "N": n, "M": m, "kernel": name, "ms": t} for name, t in times.items()]
        print(f"K={k} N={n} M={m}: " + ", ".join(f"{a} {t * 1e3:.1f} us" for a, t in times.items()), flush=True)
        save_probe(json_path, rows, failures)
    print_failures(failures)


def main() -> None:
    from gemm import (  # benchmarks/gemm.py: the same timing method
        print_failures,
        save_probe,
        time_graph,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--ms", default="1,16,64,256,1024,4096")
    p.add_argument("--ks", default="4096,11008,28672")
    p.add_argument("--swiglu", action="store_true", help="rows of a fused gate/up output, 2K wide (module docstring)")
    p.add_argument("--pairs", action="store_true", help="the act-quant with its layer's GEMM, launched early or not")
    args = p.parse_args()
    if args.pairs:
        release_pairs(args.json, [int(m) for m in args.ms.split(",")])
        return
    rows, failures = [], []
    width = 2 if args.swiglu else 1
    for k in map(int, args.ks.split(",")):
        for m in map(int, args.ms.split(",")):
            sets = [torch.randn(m, width * k, device="cuda", dtype=torch.float16)
                    for _ in range(min(4000, max(2, math.ceil(256e6 / ((2 * width + 1) * m * k)))))]
            want = quantize_activations_triton(sets[0], swiglu=args.swiglu)
            if not args.swiglu:  # against the reference itself too
                ref = quantize_activations(sets[0].cpu())
                if not (torch.equal(want[0].cpu(), ref[0]) and torch.equal(want[1].cpu(), ref[1])):
                    failures.append(f"M={m} K={k} rule against dgq.formats.quantize_activations")
            fewest = (2 * width + 1) * m * k  # bytes: fp16 in (gate and up with --swiglu), int8 out
            rule = _rule(m, k, args.swiglu)
            line = []
            for variant in _variants(m, k, args.swiglu):
                got = _run(sets[0], variant, args.swiglu)
                if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                    failures.append(f"M={m} K={k} {_name(variant)}")
                    continue
                t = time_graph([lambda x=x, v=variant: _run(x, v, args.swiglu) for x in sets])
                rows.append({"M": m, "K": k, "variant": _name(variant), "ms": t, "rule": variant == rule,
                             "swiglu": args.swiglu})
                line.append(f"{_name(variant)} {t * 1e3:.1f} us ({fewest / t / 1e6:.0f} GB/s)"
                            + (" rule" if variant == rule else ""))
            print(f"M={m} K={k}: " + ", ".join(line), flush=True)
            save_probe(args.json, rows, failures)
    print_failures(failures)


if __name__ == "__main__":
    main()
