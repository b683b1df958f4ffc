"""Config search for the one-token A8W4 GEMV (:mod:`dgq.kernels.gemv`), and the act-quant's cost at one token.

Two parts, on the shapes and with the cold-L2 CUDA-graph timing of ``benchmarks/gemm.py``:

* ``--sweep``: variants (rows per program, K tiles per chunk, K splits, warps) side by side with the rule
  (:func:`dgq.kernels.gemv.config_for`) and cuBLAS FP16; every variant is checked against the exact fp32 epilogue of
  ``torch._int_mm`` first, and again after the graph's replays (the split-K counts must be left at zero);
* ``--fused``: the GEMV that quantizes inside (:func:`dgq.kernels.gemv.a8w4_gemv_float`) against the act-quant
  kernel + the GEMV, and the GEMV alone, which is where :func:`dgq.kernels.gemv.quantizes_inside` comes from.

How the rules were chosen (benchmarks/notes_gemm.md); run it again when the kernel changes:

    PYTHONPATH=. python benchmarks/gemv_probe.py --sweep --fused --json $OUT/gemv.json     # the H100

``--decode`` times each path on the decode step's own layer shapes.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton

from dgq.kernels import gemv
from dgq.kernels.act_quant import quantize_activations_triton


def _cfg(bn: int, tpi: int, split: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn, "TPI": tpi, "SPLIT_K": split}, num_warps=warps, num_stages=1)


VARIANTS = ([_cfg(64, 4, s, 4) for s in (1, 2, 4, 8, 16)] + [_cfg(64, 2, s, 4) for s in (2, 4, 8, 16)]
            + [_cfg(32, 4, s, 2) for s in (4, 8, 16)] + [_cfg(128, 1, s, 4) for s in (4, 8, 16)]
            + [_cfg(128, 2, s, 4) for s in (4, 8)] + [_cfg(64, 1, 16, 2), _cfg(64, 8, 4, 4), _cfg(64, 8, 8, 4),
                                                     _cfg(32, 2, 16, 2), _cfg(64, 4, 4, 8), _cfg(128, 4, 4, 8)])


def _name(c: triton.Config) -> str:
    return f"bn{c.kwargs['BLOCK_N']}_tpi{c.kwargs['TPI']}_split{c.kwargs['SPLIT_K']}_w{c.num_warps}"


def measure(json_path: str | None, sweep: bool, fused: bool) -> None:
    from gemm import (  # benchmarks/gemm.py: same operands and timing method
        SHAPES,
        operand_sets,
        print_failures,
        save_probe,
        time_graph,
    )

    rows, failures, ratios = [], [], {"fused": [], "two_launches": [], "gemv_alone": []}
    for k, n in SHAPES:
        sets = operand_sets(k, n)
        for o in sets:
            o.set_acts(1)
        o = sets[0]
        pad = torch.zeros(32, k, dtype=torch.int8, device="cuda")
        pad[:1] = o.x_s8
        want = (torch._int_mm(pad, o.w8.t())[:1].float() * o.s_x.float() * o.kw.s1).half()
        times = {"fp16": time_graph([lambda o=o: o.x16 @ o.w16.t() for o in sets]),
                 "gemv_alone": time_graph([lambda o=o: gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x) for o in sets])}
        rule = gemv.config_for(n, k, o.kw.tile_k)
        if fused:
            if not torch.equal(gemv.a8w4_gemv_float(o.x16, o.kw), _two_launches(o, gemv.a8w4_gemv)):
                failures.append(f"K={k} N={n} fused != two launches")
            times["fused"] = time_graph([lambda o=o: gemv.a8w4_gemv_float(o.x16, o.kw) for o in sets])
            times["two_launches"] = time_graph([lambda o=o: _two_launches(o, gemv.a8w4_gemv) for o in sets])
        for c in VARIANTS if sweep else ():
            name = _name(c)
            if not torch.equal(gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x, config=c), want) or o.kw.split_scratch.any():
                failures.append(f"K={k} N={n} {name}")
                continue
            times[name] = time_graph([lambda o=o, c=c: gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x, config=c) for o in sets])
            if not torch.equal(gemv.a8w4_gemv(o.x_s8, o.kw, o.s_x, config=c), want):
                failures.append(f"K={k} N={n} {name} after replays")
        rows += [{"K": k, "N": n, "M": 1, "kernel": name, "ms": t, "rule": name == _name(rule)}
                 for name, t in times.items()]
        for key, got in ratios.items():
            if key in times:
                got.append(times["fp16"] / times[key])
        shown = " ".join(f"{name} {times['fp16'] / t:.2f}x" for name, t in times.items()
                         if not name.startswith("bn") or name == _name(rule))
        best = min((t, name) for name, t in times.items())
        print(f"K={k} N={n}: fp16 {times['fp16'] * 1e3:.1f} us; {shown} (rule {_name(rule)}); fastest {best[1]}",
              flush=True)
        save_probe(json_path, rows, failures)
    print("medians vs fp16:", {key: round(statistics.median(v), 2) for key, v in ratios.items() if v})
    print_failures(failures)


def _two_launches(o, kernel):
    """The act-quant kernel, then ``kernel`` on its codes: the two launches a layer makes without quantizing inside."""
    q, s = quantize_activations_triton(o.x16)
    return kernel(q, o.kw, s)


# (K, N) of the decode step's layers, q/k/v and gate/up fused: Llama-2-7B, then Llama-3-8B's that differ
DECODE_SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 6144), (4096, 28672),
                 (14336, 4096)]


def decode_layers(json_path: str | None) -> None:
    """Each decode layer shape at one token: the dispatch (:func:`dgq.kernels.linear.a8w4_linear`) beside the act-quant
    + the GEMV, the GEMV quantizing inside, and the act-quant + the warp-specialized kernel, each checked equal to the
    dispatch first (which is where :data:`dgq.kernels.linear.GEMV_MAX_N` and ``quantizes_inside`` are checked on the
    model's own shapes)."""
    from gemm import operand_sets, print_failures, save_probe, time_graph

    from dgq.kernels import gemm_ws
    from dgq.kernels.linear import a8w4_linear

    rows, failures = [], []
    for k, n in DECODE_SHAPES:
        sets = operand_sets(k, n)
        for o in sets:
            o.set_acts(1)
        o = sets[0]
        want = a8w4_linear(o.x16, o.kw)
        calls = {"fp16": lambda o: o.x16 @ o.w16.t(), "dispatch": lambda o: a8w4_linear(o.x16, o.kw),
                 "act_quant+gemv": lambda o: _two_launches(o, gemv.a8w4_gemv),
                 "gemv_inside": lambda o: gemv.a8w4_gemv_float(o.x16, o.kw),
                 "act_quant+ws": lambda o: _two_launches(o, gemm_ws.ws_a8w4_matmul)}
        times = {}
        for name, fn in calls.items():
            if name != "fp16" and not torch.equal(fn(o), want):
                failures.append(f"K={k} N={n} {name}")
                continue
            times[name] = time_graph([lambda o=o, fn=fn: fn(o) for o in sets])
            if name != "fp16" and (not torch.equal(fn(o), want) or o.kw.split_scratch.any()):
                failures.append(f"K={k} N={n} {name} after replays")
        rows += [{"K": k, "N": n, "M": 1, "kernel": name, "ms": t} for name, t in times.items()]
        wbytes = o.kw.codes.numel() + 2 * o.kw.s2t.numel()
        print(f"K={k} N={n}: " + ", ".join(f"{name} {t * 1e3:.1f} us ({wbytes / t / 1e9:.2f} TB/s)"
                                          for name, t in times.items() if name != "fp16")
              + f"; fp16 {times['fp16'] * 1e3:.1f} us", flush=True)
        save_probe(json_path, rows, failures)
    print_failures(failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the rows here as they come")
    parser.add_argument("--sweep", action="store_true", help="time the config variants")
    parser.add_argument("--fused", action="store_true", help="time quantizing inside against two launches")
    parser.add_argument("--decode", action="store_true",
                        help="the decode step's layer shapes: each path at one token (instead of the other parts)")
    args = parser.parse_args()
    if args.decode:
        decode_layers(args.json)
    else:
        measure(args.json, args.sweep, args.fused)


if __name__ == "__main__":
    main()
