"""Figures and the table of benchmarks/e2e.py's results: prefill runtime and peak memory against sequence length
per format (like the DGQ paper's Figure 4), and decode throughput per batch size.

Takes one or more result files or folders of them (each written by one ``e2e.py`` run) and the modes to show
(rows of another mode, and rows of older runs that record none, are left out unless ``--prefill-mode`` /
``--decode-mode`` name them; ``none`` selects rows without a mode).  A measurement no run made shows as "-".
Profile rows (``e2e.py --profile``) print as a second table (:func:`profile_table`).

    python benchmarks/plot_e2e.py results/e2e_h100_compiled --out docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", default=["results/e2e_h100_compiled"])
    parser.add_argument("--out", default="docs")
    parser.add_argument("--prefill-mode", default="graph")
    parser.add_argument("--decode-mode", default="compiled")
    args = parser.parse_args()
    files = [f for p in map(Path, args.results) for f in (sorted(p.glob("*.json")) if p.is_dir() else [p])]
    wanted = {"prefill": args.prefill_mode, "decode": args.decode_mode}
    rows = [r for f in files for r in json.loads(f.read_text())
            if r["phase"] in wanted and r.get("mode", "none") == wanted[r["phase"]]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    formats = list(dict.fromkeys(series(r) for r in rows))
    for key, label, name in (("ms", "prefill latency (ms, batch 1)", "e2e_prefill.png"),
                             ("peak_mem_bytes", "peak GPU memory (GiB, batch 1)", "e2e_memory.png")):
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models):
            for fmt in formats:
                pts = sorted((r["seqlen"], r[key]) for r in rows if r["model"] == model and series(r) == fmt
                             and r["phase"] == "prefill" and r["batch"] == 1)
                scale = 2**30 if key == "peak_mem_bytes" else 1
                ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], marker="o", label=fmt)
            ax.set(title=model, xlabel="sequence length", ylabel=label, xscale="log", yscale="log")
            ax.minorticks_off()
            ax.set_xticks([256, 512, 1024, 2048, 4096], labels=["256", "512", "1024", "2048", "4096"])
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        batches = sorted({r["batch"] for r in rows if r["model"] == model and r["phase"] == "decode"})
        width = 0.8 / len(formats)
        for i, fmt in enumerate(formats):
            tps = [next((r["tokens_per_s"] for r in rows if r["model"] == model and series(r) == fmt
                         and r["phase"] == "decode" and r["batch"] == b), 0.0) for b in batches]
            ax.bar([j + i * width for j in range(len(batches))], tps, width, label=fmt)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], labels=[f"batch {b}" for b in batches])
        ax.set(title=f"{model}: decode, 1024-token context", ylabel="tokens / s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "e2e_decode.png", dpi=110)
    print(markdown_table(rows))
    profiles = [r for f in files for r in json.loads(f.read_text()) if r["phase"] == "profile"]
    if profiles:
        print()
        print(profile_table(profiles, rows))


def series(row: dict) -> str:
    """A row's series: its format, ``, int8 head+emb`` (or ``head``, ``emb``) where its LM head and embedding are
    int8 rows (dgq.int8_rows), and how its decode steps attended when not the benchmark's default (dgq's kernel over an fp16
    cache): ``, int8 KV`` (dgq.kv_cache), ``, SDPA``."""
    rows8 = "+".join(name for name, key in (("head", "int8_head"), ("emb", "int8_embedding")) if row.get(key))
    return row["format"] + (f", int8 {rows8}" if rows8 else "") + (
        ", int8 KV" if row.get("kv_cache") == "int8" else "") + (", SDPA" if row.get("attention") == "sdpa" else "")


def profile_table(profiles: list[dict], rows: list[dict]) -> str:
    """Each profile row (``e2e.py --profile``) as BENCHMARKS.md shows it: microseconds per step by category, from the
    run's recorded top-12 kernels sorted again with :func:`dgq.bench.category` (so a run made with an older
    categorizer reads the same), the rest of the kernel time as one column, and the step's wall time from the
    matching measurement (decode: batch / tokens per second; prefill: its ms)."""
    from dgq.bench import category

    cats = ("gemm", "attention", "act_quant", "norm", "other")
    lines = ["| model | format | step | wall us | " + " | ".join(cats) + " | rest | kernels |", "|" + "---|" * 11]
    for p in profiles:
        parts = {c: {} for c in cats}
        for kernel, us in p["us"]["top"].items():
            parts[category(kernel)][kernel] = us
        kind, _, size = p["what"].partition(" ")
        match = next((r for r in rows if (r["model"], series(r), r["phase"]) == (p["model"], series(p), kind)
                      and (r["batch"] == int(size[1:]) if kind == "decode" else r["seqlen"] == int(size))), None)
        wall = None if match is None else (match["batch"] * 1e6 / match["tokens_per_s"] if kind == "decode"
                                           else match["ms"] * 1e3)
        cells = []
        for c in cats:
            top = sorted(parts[c].items(), key=lambda kv: -kv[1])
            detail = ", ".join(f"{k[:24]} {v:.0f}" for k, v in top) if c == "gemm" and len(top) > 1 else ""
            cells.append(f"{sum(parts[c].values()):.0f}" + (f" ({detail})" if detail else ""))
        rest = p["us"]["total"] - sum(p["us"]["top"].values())
        lines.append(f"| {p['model']} | {series(p)} | {p['what']} | {'-' if wall is None else f'{wall:.0f}'} | "
                     + " | ".join(cells) + f" | {rest:.0f} | {p['us']['kernels']:.0f} |")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """Every row of the run as the Markdown table BENCHMARKS.md shows."""
    def get(r_model: str, fmt: str, phase: str, batch: int, seqlen: int, key: str) -> float | None:
        return next((r.get(key) for r in rows if (r["model"], series(r), r["phase"], r["batch"], r["seqlen"])
                     == (r_model, fmt, phase, batch, seqlen)), None)

    def cell(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| model | format | 256 | 512 | 1024 | 2048 | 4096 | 8x1024 | decode b1 | b8 | b32 | weights GiB | "
             "peak@2048 GiB | warm peak@2048 GiB |", "|" + "---|" * 14]
    for model in dict.fromkeys(r["model"] for r in rows):
        for fmt in dict.fromkeys(series(r) for r in rows if r["model"] == model):
            pre = [get(model, fmt, "prefill", 1, s, "ms") for s in (256, 512, 1024, 2048, 4096)]
            pre.append(get(model, fmt, "prefill", 8, 1024, "ms"))
            dec = [get(model, fmt, "decode", b, 1024, "tokens_per_s") for b in (1, 8, 32)]
            weights = next(r["weight_bytes"] for r in rows if (r["model"], series(r)) == (model, fmt))
            peaks = [get(model, fmt, "prefill", 1, 2048, key) for key in ("peak_mem_bytes", "warm_peak_mem_bytes")]
            cells = [cell(v, ".1f") for v in pre] + [cell(v, ".0f") for v in dec]
            cells += [f"{weights / 2**30:.2f}"] + [cell(None if p is None else p / 2**30, ".2f") for p in peaks]
            lines.append(f"| {model} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
