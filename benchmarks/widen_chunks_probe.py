"""Widen-once in row chunks that stay in L2: does the large-M A8W4 path lose its widening cost?

Today at M >= 2048 (K < 2N) a layer widens its whole weight to int8 (``widen_weight``: reads the packed codes,
writes N x K bytes to device memory) and then the int8 GEMM reads those bytes back.  For Llama-2-7B's fused
gate/up (4096 x 22016) that is a 90 MB write and a 90 MB read per call, about 3 ms of a 38.5 ms prefill over the
model.  Widening ``rows`` output channels at a time into one reused scratch buffer small enough to stay in the
50 MB L2, each chunk multiplied before the next is widened over it, should keep most of those bytes out of device
memory: the widening's write lands in L2 and the GEMM reads it from there.  Prediction: the chunked path within a
few percent of the int8 GEMM on a ready weight (the W8A8 floor), against widen-once's 10-15% above it.

Each variant is checked bit-exact against widen-once first; timing as ``benchmarks/gemm.py`` (cold-L2 CUDA graph
over enough operand sets), activation codes ready (the act-quant is the same for every variant):

    PYTHONPATH=. python benchmarks/widen_chunks_probe.py --json $OUT/widen_chunks.json
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dgq.kernels.gemm import widen_rows, widen_weight
from dgq.kernels.int8_gemm import int8_matmul

SHAPES = [(4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096)]  # (K, N): Llama-2-7B's layers, q/k/v, gate/up fused
CHUNKS = [1024, 2048, 4096]


def chunked(o, rows: int, scratch: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - gemm.Operands
    """The layer's output from ``rows``-channel chunks widened into ``scratch`` one after another."""
    kw, n = o.kw, o.kw.out_features
    out = torch.empty((o.x_s8.shape[0], n), dtype=torch.float16, device="cuda")
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        w = widen_rows(kw, start, stop, scratch[: stop - start])
        int8_matmul(o.x_s8, w, o.s_x, kw.s1[start:stop], None, torch.float16, out=out[:, start:stop])
    return out


def main() -> None:
    from gemm import Operands, make_weight, operand_sets, save_probe, time_graph  # noqa: F401 - benchmarks/gemm.py

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--m", type=int, default=2048)
    args = parser.parse_args()
    rows, failures = [], []
    for k, n in SHAPES:
        sets = operand_sets(k, n)
        for o in sets:
            o.set_acts(args.m)
        scratch = torch.empty((max(CHUNKS), k), dtype=torch.int8, device="cuda")
        variants = {"ready_int8": lambda o: int8_matmul(o.x_s8, o.w8, o.s_x, o.kw.s1, None, torch.float16),
                    "widen_once": lambda o: int8_matmul(o.x_s8, widen_weight(o.kw), o.s_x, o.kw.s1, None,
                                                        torch.float16)}
        variants.update({f"chunks_{r}": (lambda o, r=r: chunked(o, r, scratch)) for r in CHUNKS if r < n})
        want = variants["widen_once"](sets[0])
        times = {}
        for name, fn in variants.items():
            got = fn(sets[0])
            if not torch.equal(got, want):
                failures.append(f"{k}x{n} {name}: max diff {(got.float() - want.float()).abs().max().item()}")
                continue
            times[name] = time_graph([lambda o=o, fn=fn: fn(o) for o in sets])
            rows.append({"K": k, "N": n, "M": args.m, "variant": name, "ms": times[name]})
        save_probe(args.json, rows, failures)
        base = times["ready_int8"]
        print(f"{k}x{n} M={args.m}: " + ", ".join(f"{v} {t * 1000:.1f} us ({t / base:.3f})" for v, t in times.items()),
              flush=True)
    print(f"{len(failures)} failures", *failures, sep="\n")
    for v in ["widen_once"] + [f"chunks_{r}" for r in CHUNKS]:
        r = [x["ms"] for x in rows if x["variant"] == v]
        if r:
            print(f"{v}: total {sum(r) * 1000:.1f} us over the shapes run")


if __name__ == "__main__":
    main()
