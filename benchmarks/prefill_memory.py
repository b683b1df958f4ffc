"""Where a prefill's peak memory goes: the peak of the warm-up calls (compilation, autotuning), of the CUDA graph's
capture (the weights and the graph's memory pool) and of its replays (which allocate nothing, so they miss the
pool), and what is live at the highest of them beyond the weights, by the source line that allocated it
(``torch.cuda.memory`` history).  The model and format are ``benchmarks/e2e.py``'s; the prefill is
:func:`dgq.bench.prefill`'s (compiled blocks, one CUDA graph, last position's logits), in inference mode.

Why: issue 12's target compares peak memory at 2048 tokens with W8A8's, and ``e2e.py``'s figure is a single maximum
over the whole run, which cannot say whether the weights, the activations or a one-time buffer set it.

    PYTHONPATH=.:benchmarks python benchmarks/prefill_memory.py --formats dgq_dynamic,w8a8 --seqlen 2048 \
        --out results/prefill_memory_h100.json

``--int8-rows`` gives the DGQ formats the int8 LM head and input embedding (W8A8 keeps both in fp16).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

OURS = ("dgq/", "benchmarks/", "triton/", "_inductor", "transformers/")  # frames worth naming


def _where(event: dict) -> str:
    frames = [f for f in event.get("frames", []) if any(s in f["filename"] for s in OURS)]
    return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in frames[:4]) or "?"


def _live_at_peak(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """Replays the allocator's events: the most bytes allocated at once since recording began, and the blocks then."""
    live: dict[int, dict] = {}
    now = best = 0
    best_live: dict[int, dict] = {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            now += event["size"]
            if now > best:
                best, best_live = now, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            now -= live.pop(event["addr"])["size"]
    return best, best_live


def measure(model_name: str, fmt: str, seqlen: int, int8_rows: bool) -> dict:
    import e2e

    from dgq import bench
    from dgq.attention import use_decode_attention

    torch._dynamo.config.recompile_limit = 512
    model = use_decode_attention(e2e.convert(e2e.build(model_name), fmt, int8_head=int8_rows,
                                                 int8_embedding=int8_rows))
    gc.collect()
    torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated()
    vocab = e2e.MODELS[model_name]["vocab_size"]
    ids, mask = torch.randint(0, vocab, (1, seqlen), device="cuda"), bench.causal_mask(1, seqlen)
    forward = bench.compiled(model, dynamic=True)
    torch.cuda.memory._record_memory_history(max_entries=400_000)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        step = lambda: forward(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)  # noqa: E731
        bench.warm_up(step)
        first = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        replay = bench.capture(step)
        torch.cuda.synchronize()
        captured = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            replay()
        torch.cuda.synchronize()
    replayed = torch.cuda.max_memory_allocated()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    over, blocks = _live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
    by_site, count = collections.Counter(), collections.Counter()
    for event in blocks.values():
        by_site[_where(event)] += event["size"]
        count[_where(event)] += 1
    return {"model": model_name, "format": fmt, "seqlen": seqlen, "int8_rows": int8_rows and fmt.startswith("dgq"),
            "resident_bytes": resident,
            "warm_up_peak_bytes": first, "capture_peak_bytes": captured, "replay_peak_bytes": replayed,
            "transient_peak_bytes": over,
            "live_at_peak": [{"site": site, "bytes": size, "blocks": count[site]}
                             for site, size in by_site.most_common(12)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--formats", default="dgq_dynamic,w8a8")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--int8-rows", action="store_true",
                   help="DGQ formats: the LM head and the input embedding as int8 rows (dgq.int8_rows)")
    p.add_argument("--out", required=True)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks/prefill_memory.py needs a CUDA GPU")
    if args.child:  # one format per process, so one cannot hold memory the next one's peak would count
        print(json.dumps(measure(args.model, args.formats, args.seqlen, args.int8_rows)))
        return
    rows = []
    for fmt in args.formats.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--formats", fmt,
                               "--seqlen", str(args.seqlen), "--out", args.out] + ["--int8-rows"] * args.int8_rows,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"error: {fmt} failed:\n{done.stderr[-2000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        gib = 2 ** 30
        print(f"{fmt}: resident {row['resident_bytes'] / gib:.3f} GiB, warm-up peak "
              f"{row['warm_up_peak_bytes'] / gib:.3f}, capture peak {row['capture_peak_bytes'] / gib:.3f}, replay peak "
              f"{row['replay_peak_bytes'] / gib:.3f}", flush=True)
        for site in row["live_at_peak"][:5]:
            print(f"    {site['bytes'] / 2**20:8.1f} MiB  {site['site']}", flush=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
