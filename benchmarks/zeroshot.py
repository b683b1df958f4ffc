"""Zero-shot accuracy (lm-evaluation-harness, our offline task definitions) of FP and the W4A8 methods on one model.

Regenerates ``results/smollm2_zeroshot.json`` and the table between the ``zeroshot`` markers of RESULTS.md.  Each
(method, task) result is written as soon as it exists and kept on the next run with the same settings, so a long
run can be split over several invocations (``--methods``, ``--tasks``); a table never mixes calibration sizes,
group sizes or item limits (the script refuses).  Quantization uses the same calibration samples as
``benchmarks/accuracy.py`` (C4 calibration half, seed 0), so the two tables describe the same quantized models.

    python benchmarks/zeroshot.py --device cuda --nsamples 128 --limit all     # the full table (H100: see RESULTS.md)
    python benchmarks/zeroshot.py --nsamples 8 --limit 20 --methods fp,dgq_dynamic --json /tmp/z.json   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from accuracy import LABELS, ROOT, _write_atomic, add_common_args, record_command, results, update_results_md
from dgq.api import quantize
from dgq.config import preset
from dgq.data import calibration_samples
from dgq.eval.zeroshot import TASKS, zeroshot
from dgq.loading import load_model

METHODS = ["fp", "w4a8_rtn", "w4a8_smoothquant", "w4a8_group", "dgq_dynamic", "dgq_static"]
HEADERS = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "boolq": "BoolQ", "hellaswag": "HellaSwag",
           "winogrande": "WinoGrande", "lambada_openai": "LAMBADA"}


def _settings(args: argparse.Namespace) -> dict:
    return {"model": args.label or args.model, "group_size": args.group_size, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "limit": "all" if args.limit is None else args.limit, "device": args.device}


def _load(path: Path, settings: dict) -> dict:
    if not path.exists():
        return {**settings, "results": {}, "quantize_seconds": {}, "eval_seconds": {}, "commands": []}
    data = json.loads(path.read_text())
    clash = {k: (data.get(k), v) for k, v in settings.items() if data.get(k) != v}
    if clash:
        raise SystemExit(f"error: {path} holds results with other settings {clash}; move it away to start anew")
    return data


def run(args: argparse.Namespace) -> dict:
    out = Path(args.json)
    data = _load(out, _settings(args))
    record_command(data, "zeroshot.py")
    base, tokenizer, _ = load_model(args.model)
    samples = None
    for method in args.methods:
        done = data["results"].setdefault(method, {})
        todo = [t for t in args.tasks if t not in done or args.redo]
        if not todo:
            print(f"{method}: kept {', '.join(args.tasks)} from {out.name}")
            continue
        model = copy.deepcopy(base)
        if method != "fp":
            if samples is None:
                samples = calibration_samples(tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                              root=args.data_dir)
            config = preset(method, group_size=args.group_size, nsamples=args.nsamples, seqlen=args.seqlen)
            data["quantize_seconds"][method] = round(quantize(model, samples, config, device=args.device).seconds, 1)
        model.to(args.device)
        for task in todo:
            start = time.perf_counter()
            done[task] = zeroshot(model, tokenizer, [task], limit=args.limit, root=args.data_dir,
                                  batch_size=args.batch_size)[task]
            data["eval_seconds"].setdefault(method, {})[task] = round(time.perf_counter() - start, 1)
            print(f"{method} {task}: {done[task]}", flush=True)
            _write_atomic(out, json.dumps(data, indent=2) + "\n")
        del model
    return data


def _cell(row: dict | None, task: str) -> str:
    if row is None:
        return "not run"
    if task == "lambada_openai":
        return f"{100 * row['acc']:.1f} ({row['perplexity']:.1f})"
    norm = f" / {100 * row['acc_norm']:.1f}" if "acc_norm" in row else ""
    return f"{100 * row['acc']:.1f}{norm}"


def table(data: dict) -> str:
    tasks = [t for t in TASKS if any(t in r for r in data["results"].values())]
    head = "| method | preset | " + " | ".join(HEADERS[t] for t in tasks) + " | mean acc |"
    lines = [head, "|---|---|" + "---|" * (len(tasks) + 1)]
    for method in METHODS:
        results = data["results"].get(method, {})
        if not results:
            continue
        accs = [results[t]["acc"] for t in tasks if t in results]
        mean = f"{100 * sum(accs) / len(accs):.1f}" if len(accs) == len(tasks) else "incomplete"
        lines.append(f"| {LABELS[method]} | `{method}` | " + " | ".join(_cell(results.get(t), t) for t in tasks)
                     + f" | {mean} |")
    items = {t: next(r[t]["n"] for r in data["results"].values() if t in r) for t in tasks}
    scope = ("all items of each task" if data["limit"] == "all" else
             f"only the first {data['limit']} items of each task (a smoke run, not comparable with published tables)")
    intro = (f"Model `{data['model']}`, zero-shot, lm-evaluation-harness {_lm_eval_version()} on dgq's offline task "
             f"definitions, {scope}: " + ", ".join(f"{HEADERS[t]} {n}" for t, n in items.items()) +
             f". Quantized with group size {data['group_size']}, calibration {data['nsamples']} x {data['seqlen']} "
             f"tokens of the C4 calibration half (seed 0), computed on {data['device']}. Cells: acc / acc_norm in %, "
             f"LAMBADA: acc in % (perplexity); mean acc over the columns.")
    return "\n".join([intro, ""] + lines + ["", "Produced by:", "", "```"] + data["commands"] + ["```"])


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=str(ROOT / "results" / "smollm2_zeroshot.json"),
                        help="results file to create or extend")
    parser.add_argument("--no-results-md", action="store_true", help="leave RESULTS.md alone")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of presets to run")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma list of zero-shot tasks")
    parser.add_argument("--limit", type=lambda v: None if v == "all" else int(v), default=None,
                        help="first N items of each task, or 'all' (default)")
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval requests per forward pass")
    add_common_args(parser, nsamples=128)
    args = parser.parse_args()
    args.methods = [m for m in args.methods.split(",") if m]
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = [m for m in args.methods if m not in METHODS] + [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: unknown method or task {unknown[0]!r}")
    text = table(results(args, run))
    if not args.no_results_md:
        update_results_md(text, "zeroshot")
    print(text)


if __name__ == "__main__":
    main()
