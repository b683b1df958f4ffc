"""GEMM benchmark on one CUDA GPU: dgq's A8W4 kernels against FP16, int8, FP8 and W4A16 peers.

    PYTHONPATH=. python benchmarks/gemm.py --out results/gemm_h100_run4.json

First checks correctness on the GPU (act-quant bit-exact, the production path's
outputs equal the exact reference up to the output's rounding, QuantLinear fast path = reference), then times every
(shape, M, kernel): each kernel's calls over several fresh random operand sets (enough that the bytes touched exceed
the L2 several times) are captured in one CUDA graph, replayed after warm-up (which also autotunes), and the median
replay time per call is reported.  Writes ``[{"K", "N", "M", "kernel", "ms"}]`` to ``--out`` (plus the config the
autotuner picked for ``dgq``) and prints a table of ms and speed-up vs FP16.

Peers: cuBLAS FP16, ``torch._int_mm``, FP8 row-wise ``_scaled_mm``, our TMA int8 kernel on a ready int8 weight
(``w8a8_triton``: A8W4 with free widening), tinygemm W4A16, and GemLite W4A16 when the ``gemlite`` package imports.
dgq's own rows: ``dgq`` (what ``QuantLinear`` runs, act-quant included, path by M: ``dgq.kernels.linear``) and each
path alone from int8 activations: ``dgq_gemv`` (the register-fed GEMV, M <= 16 only: it re-reads the weight per
token), ``dgq_gemv_tma`` (the TMA-fed GEMV, Hopper, likewise), ``dgq_gemv_inside`` (the TMA-fed GEMV quantizing
the fp16 activation itself, one launch, M = 1: what ``dgq`` ran at one token until session 18), ``dgq_ws`` (the
warp-specialized Hopper kernel, M <= 2047, to 4095 on long-K layers), ``dgq_pp`` (the ping-pong Hopper kernel, where its rule takes the layer: from
65 tokens), ``dgq_gemm_only`` (in-register widening), ``dgq_widen_once`` (widen + TMA int8
kernel).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from dgq.formats import DualGrainedWeight, int_matmul, quantize_activations
from dgq.kernels import gemm, gemm_pp, gemm_ws, gemv, gemv_tma, int8_gemm, linear
from dgq.kernels.act_quant import quantize_activations_triton
from dgq.kernels.gemm import KernelWeight, a8w4_matmul, widen_weight
from dgq.kernels.gemv import a8w4_gemv
from dgq.kernels.int8_gemm import int8_matmul
from dgq.nn import QuantLinear

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672), (28672, 8192)]  # (K, N)
MS = [1, 16, 64, 256, 1024, 4096, 8192]
GROUP = 128
TOUCH_BYTES = 256e6  # bytes each timed graph touches at least (~5x the H100's 50 MB L2)
PEAK_INT8_TOPS, PEAK_FP16_TFLOPS = 1979.0, 989.0  # H100 SXM dense datasheet
KERNELS = ["fp16", "int_mm", "w8a8_triton", "w4a16_tinygemm", "w4a16_gemlite", "fp8_rowwise", "dgq", "dgq_gemv",
           "dgq_gemv_tma", "dgq_gemv_inside", "dgq_ws", "dgq_pp", "dgq_gemm_only", "dgq_widen_once"]  # dgq: one of the
# last seven


def make_weight(n: int, k: int, g: int) -> DualGrainedWeight:
    """Random valid dual-grained weight: s2 <= 8 keeps every code's s2 * |u4 - zp| <= 120."""
    dev = "cuda"
    return DualGrainedWeight(u4=torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev),
                             zp=torch.randint(0, 16, (n, k // g), dtype=torch.uint8, device=dev),
                             s2=torch.randint(1, 9, (n, k // g), dtype=torch.int8, device=dev),
                             s1=torch.rand(n, device=dev) * 1e-3 + 1e-4, group_size=g)


class Operands:
    """All forms of one random weight and one random activation that the kernels consume."""

    def __init__(self, dg: DualGrainedWeight) -> None:
        self.dg = dg
        self.kw = KernelWeight.from_dual_grained(dg)
        self.w8 = dg.int8_weight()
        self.w16 = (dg.s1[:, None] * self.w8.float()).half()
        self.w_fp8 = self.w8.to(torch.float8_e4m3fn)
        self.s1_row = dg.s1[None, :].contiguous()
        self._tiny: torch.Tensor | None = None
        self.tiny_sz = torch.rand(dg.zp.shape[1], dg.zp.shape[0], 2, device="cuda").to(torch.bfloat16)
        self._gemlite: torch.nn.Module | None = None

    def gemlite(self) -> torch.nn.Module:
        """GemLite's W4A16 layer on the same codes (float group scales s1*s2, zero points zp)."""
        if self._gemlite is None:
            import gemlite  # noqa: PLC0415 - optional peer, carried to the GPU machine as a package
            n, k = self.dg.u4.shape
            layer = gemlite.GemLiteLinear(4, group_size=GROUP, in_features=k, out_features=n,
                                          input_dtype=gemlite.DType.FP16, output_dtype=gemlite.DType.FP16)
            scales = (self.dg.s1[:, None] * self.dg.s2.float()).half()
            layer.pack(self.dg.u4, scales, self.dg.zp.half(), None)
            self._gemlite = layer
        return self._gemlite

    def tiny(self) -> torch.Tensor:
        if self._tiny is None:
            u4 = self.dg.u4
            self._tiny = torch._convert_weight_to_int4pack((u4[:, 0::2] << 4) | u4[:, 1::2], 8)
        return self._tiny

    def set_acts(self, m: int) -> None:
        k = self.w8.shape[1]
        self.x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
        self.xbf = self.x16.to(torch.bfloat16)
        self.x_s8, self.s_x = quantize_activations(self.x16)
        self.x_fp8 = self.x_s8.to(torch.float8_e4m3fn)


def operand_sets(k: int, n: int) -> list[Operands]:
    """Enough random operand sets of one shape that a graph over them touches >= TOUCH_BYTES of packed weight."""
    return [Operands(make_weight(n, k, GROUP)) for _ in range(min(24, max(2, math.ceil(
        TOUCH_BYTES / (n * k * (0.5 + 2 / GROUP))))))]


def sets_at(shapes: list[tuple[int, int]], ms: list[int]) -> Iterator[tuple[int, int, int, list[Operands]]]:
    """``(K, N, M, operand sets)`` for every shape and token count, the sets' activations made for M: a probe's loop,
    one shape's sets at a time."""
    for k, n in shapes:
        sets = operand_sets(k, n)
        for m in ms:
            for o in sets:
                o.set_acts(m)
            yield k, n, m, sets


def shapes_within_budget(shapes: list[tuple[int, int]], t0: float, budget_s: float
                         ) -> Iterator[tuple[int, int, list[Operands]]]:
    """``(K, N, operand sets)`` per shape, skipping (and saying so) the shapes reached after ``budget_s``."""
    for k, n in shapes:
        if time.time() - t0 > budget_s:
            print(f"budget spent: skipping {k}x{n}", flush=True)
            continue
        yield k, n, operand_sets(k, n)


def kernel_call(name: str, o: Operands) -> Callable[[], torch.Tensor]:
    """One call of kernel ``name`` on operand set ``o`` (its current activations)."""
    calls = {
        "fp16": lambda: o.x16 @ o.w16.t(),
        "int_mm": lambda: torch._int_mm(o.x_s8, o.w8.t()),
        "w8a8_triton": lambda: int8_matmul(o.x_s8, o.w8, o.s_x, o.dg.s1),
        "w4a16_tinygemm": lambda: torch._weight_int4pack_mm(o.xbf, o.tiny(), GROUP, o.tiny_sz),
        "w4a16_gemlite": lambda: o.gemlite()(o.x16),
        "fp8_rowwise": lambda: torch._scaled_mm(o.x_fp8, o.w_fp8.t(), scale_a=o.s_x, scale_b=o.s1_row,
                                                out_dtype=torch.bfloat16),
        "dgq": lambda: linear.a8w4_linear(o.x16, o.kw),
        "dgq_gemv": lambda: a8w4_gemv(o.x_s8, o.kw, o.s_x),
        "dgq_gemv_tma": lambda: gemv_tma.tma_gemv(o.x_s8, o.kw, o.s_x),
        "dgq_gemv_inside": lambda: gemv_tma.tma_gemv_float(o.x16, o.kw),
        "dgq_ws": lambda: gemm_ws.ws_a8w4_matmul(o.x_s8, o.kw, o.s_x),
        "dgq_pp": lambda: gemm_pp.pp_a8w4_matmul(o.x_s8, o.kw, o.s_x),
        "dgq_gemm_only": lambda: a8w4_matmul(o.x_s8, o.kw, o.s_x),  # in-register widening at every M
        "dgq_widen_once": lambda: int8_matmul(o.x_s8, widen_weight(o.kw), o.s_x, o.dg.s1),
    }
    return calls[name]


def chosen_config(name: str, m: int, k: int, n: int) -> object:
    """The config the kernel that ``name`` ran at ``m`` used for its last call (its autotuner's pick, or the rule's)."""
    if name == "dgq":  # the benchmark's shapes are all ones the Gluon kernels take (on Hopper)
        if m <= linear.GEMV_MAX_M:
            return gemv_tma.config_for(n, k)  # the one-token path: act-quant, then the TMA GEMV from codes
        if gemm_pp.config_for(m, n) is not None:
            name = "dgq_pp"
        else:
            name = "dgq_widen_once" if m >= linear.WIDEN_MIN_M and not gemm_ws.takes(m, k, n) else "dgq_ws"
    if name == "dgq_pp":
        return gemm_pp.config_for(m, n)
    if name == "dgq_ws":
        return gemm_ws.config_for(m, n)
    if name == "dgq_gemv":
        return gemv.config_for(n, k, gemm.tile_k_for(k, GROUP))
    if name == "dgq_gemv_tma":
        return gemv_tma.config_for(n, k)
    if name == "dgq_gemv_inside":
        return gemv_tma.config_for(n, k, inside=True)
    tuner = {"dgq_gemm_only": gemm._tuned, "dgq_widen_once": int8_gemm._tuned}[name]
    return tuner.best_config


def call_bytes(name: str, m: int, k: int, n: int) -> float:
    """Fewest bytes one call must move (weights, activations in, output)."""
    w = {"fp16": 2.0, "int_mm": 1.0, "w8a8_triton": 1.0, "fp8_rowwise": 1.0}.get(name, 0.5 + 2 / GROUP) * n * k
    x = m * k * (1 if name in ("int_mm", "w8a8_triton", "fp8_rowwise", "dgq_gemv", "dgq_gemv_tma", "dgq_ws",
                               "dgq_pp", "dgq_gemm_only", "dgq_widen_once") else 2)
    return w + x + m * n * (4 if name == "int_mm" else 2)


def save_probe(path: str | None, rows: list[dict], failures: list[str]) -> None:
    """A probe's rows and failed checks so far, rewritten after every shape (a later crash loses nothing measured)."""
    if path:
        Path(path).write_text(json.dumps({"rows": rows, "failures": failures}, indent=1))


def print_failures(failures: list[str]) -> None:
    print(f"{len(failures)} failures", *failures, sep="\n")


def time_graph(calls: list[Callable[[], torch.Tensor]], reps: int = 15) -> float:
    """Median ms per call of replaying one CUDA graph that makes all ``calls`` once."""
    for c in calls:
        c()  # warm-up: compiles and autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)


def check(sets: list[Operands], failures: list[str], tag: str) -> None:
    """Exactness on the GPU of the paths that are timed (every config's int32 accumulator is checked bit-exact by
    ``pytest -m cuda``, tests/test_kernels_cuda.py)."""
    o = sets[0]
    if not torch.equal(widen_weight(o.kw), o.w8):
        failures.append(f"{tag}: widen_weight != int8_weight")
    for m in (1, 16, 64, 1024):
        o.set_acts(m)
        q, s = quantize_activations_triton(o.x16)
        q_cpu, s_cpu = quantize_activations(o.x16.cpu())  # the exact definition (see BENCHMARKS.md: CUDA torch differs)
        if not (torch.equal(q.cpu(), q_cpu) and torch.equal(s.cpu(), s_cpu)):
            failures.append(f"{tag} M={m}: act-quant != CPU reference")
        if m == 1024:
            s_torch_cuda = quantize_activations(o.x16)[1].cpu()
            print(f"  torch's own CUDA quantize_activations: {(s_torch_cuda != s_cpu).sum().item()} of {m} row "
                  "scales differ from its CPU result (CUDA divides by a scalar via a reciprocal)")
        ref = int_matmul(q, o.w8)
        out = linear.a8w4_linear(o.x16, o.kw).double()  # the production path
        want = ref.double() * s.double() * o.dg.s1.double()
        bad = ((out - want).abs() > want.abs() * 2 ** -10 + 1e-6).sum().item()  # one fp16 rounding of fp32 products
        if bad:
            failures.append(f"{tag} M={m}: {bad} fp16 outputs differ from the exact reference by > 1 rounding")


def check_quant_linear(failures: list[str]) -> None:
    dg = make_weight(512, 4096, GROUP)
    for mode in ("dynamic", "static"):
        layer = QuantLinear.from_weight(dg, torch.randn(512, device="cuda").half(), mode,
                                        torch.tensor(0.02) if mode == "static" else None)
        on_cpu = copy.deepcopy(layer).cpu()  # the definition runs on the CPU: CUDA's own division differs (check())
        for m in (1, 21, 1500):
            x = torch.randn(1, m, 4096, device="cuda").half()
            out, ref = layer(x).double().cpu(), on_cpu.forward_reference(x.cpu()).double()
            if ((out - ref).abs() > ref.abs() * 2 ** -10 + 1e-6).any():
                failures.append(f"QuantLinear {mode} M={m}: fast path != reference")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/gemm_h100.json"))
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,KxN,...")
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--budget-s", type=float, default=1e9, help="stop timing new shapes after this many seconds")
    args = p.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms, kernels = [int(m) for m in args.ms.split(",")], args.kernels.split(",")
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    buf = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    copy_ms = time_graph([lambda b=buf: b[: 1 << 30].copy_(b[1 << 30:])], reps=10)
    hbm = 2 * (1 << 30) / copy_ms / 1e6  # GB/s
    del buf
    print(f"{props.name}, {props.multi_processor_count} SMs; measured copy {hbm:.0f} GB/s (read+write); "
          f"torch {torch.__version__}", flush=True)

    failures: list[str] = []
    check_quant_linear(failures)
    rows: list[dict] = []
    for k, n, sets in shapes_within_budget(shapes, t0, args.budget_s):
        n_sets = len(sets)
        check(sets, failures, f"K={k} N={n}")
        print(f"checked K={k} N={n} ({time.time() - t0:.0f} s); failures so far: {len(failures)}", flush=True)
        for m in ms:
            for o in sets:
                o.set_acts(m)
            for name in kernels:
                if name in ("dgq_gemv", "dgq_gemv_tma") and m > 16 or name == "dgq_gemv_inside" and m > 1:
                    continue  # one weight pass per token: not a path for M > 1 (dgq.kernels.linear)
                if name == "dgq_ws" and not gemm_ws.takes(m, k, n):
                    continue  # widen-once serves these (dgq.kernels.linear)
                if name == "dgq_pp" and gemm_pp.config_for(m, n) is None:
                    continue  # too few tiles: the warp-specialized kernel serves these
                use = sets[:min(n_sets, max(2, math.ceil(TOUCH_BYTES / call_bytes(name, m, k, n))))]
                try:
                    ms_ = time_graph([kernel_call(name, o) for o in use])
                except Exception as e:  # a peer that does not support this shape: recorded, not hidden
                    print(f"  {name} K={k} N={n} M={m}: unsupported ({type(e).__name__}: {str(e)[:100]})")
                    continue
                row = {"K": k, "N": n, "M": m, "kernel": name, "ms": ms_}
                if name.startswith("dgq"):
                    kernel_call(name, o)()  # the config the autotuner picked for this call
                    row["config"] = str(chosen_config(name, m, k, n))
                rows.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=0))
            print(f"K={k} N={n} M={m}: " + " ".join(f"{r['kernel']}={r['ms']:.4f}" for r in rows
                                                    if (r["K"], r["N"], r["M"]) == (k, n, m)), flush=True)
        del sets
        torch.cuda.empty_cache()
    report(rows, kernels, hbm)
    print(f"total {time.time() - t0:.0f} s")
    if failures:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        raise SystemExit(1)
    print("correctness: all checks passed")


def report(rows: list[dict], kernels: list[str], hbm: float) -> None:
    """Per (shape, M): ms and speed-up over FP16; then medians over shapes vs the targets."""
    t = {(r["K"], r["N"], r["M"], r["kernel"]): r["ms"] for r in rows}
    shapes = sorted({(r["K"], r["N"]) for r in rows}, key=lambda s: s[0] * s[1])
    ms = sorted({r["M"] for r in rows})
    print("\n## ms (speed-up vs fp16)")
    print("K x N, M | " + " | ".join(kernels) + " | dgq_ws TOPS, GB/s")
    for k, n in shapes:
        for m in ms:
            base = t.get((k, n, m, "fp16"))
            cells = []
            for name in kernels:
                v = t.get((k, n, m, name))
                cells.append("-" if v is None else f"{v:.4f} ({base / v:.2f}x)" if base else f"{v:.4f}")
            g = t.get((k, n, m, "dgq_ws"))
            eff = "" if g is None else (f"{2 * m * n * k / g / 1e9:.0f} TOPS ({2 * m * n * k / g / 1e9 / PEAK_INT8_TOPS:.0%}),"
                                       f" {call_bytes('dgq_ws', m, k, n) / g / 1e6:.0f} GB/s "
                                       f"({call_bytes('dgq_ws', m, k, n) / g / 1e6 / hbm:.0%})")
            print(f"{k}x{n}, {m} | " + " | ".join(cells) + f" | {eff}")
    print("\n## median over shapes of speed-up vs fp16")
    print("M | " + " | ".join(kernels) + " | dgq / best W4A16 peer")
    for m in ms:
        def med(name: str) -> str:
            r = [t[(k, n, m, "fp16")] / t[(k, n, m, name)] for k, n in shapes
                 if (k, n, m, name) in t and (k, n, m, "fp16") in t]
            return f"{statistics.median(r):.2f}x" if r else "-"
        w4 = [min(t.get((k, n, m, p), math.inf) for p in ("w4a16_tinygemm", "w4a16_gemlite")) / t[(k, n, m, "dgq")]
              for k, n in shapes if (k, n, m, "dgq") in t]
        w4 = [r for r in w4 if math.isfinite(r)]
        vs_w4 = f"{statistics.median(w4):.1f}x" if w4 else "-"
        print(f"{m} | " + " | ".join(med(name) for name in kernels) + f" | {vs_w4}")

if __name__ == "__main__":
    main()
