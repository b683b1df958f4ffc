"""The float-output fit (``float_target``) at few calibration sequences: which ridge, measured on two test sets.

Each variant is a preset with optional overrides, written ``method`` or ``method:field=value[,field=value]``
(e.g. ``dgq_gptaq:float_target_damp=4``).  Every variant is calibrated on the same ``--nsamples`` sequences of the
C4 calibration half (seed 0, as ``dgq quantize`` draws them) and scored on the first ``--windows`` windows of each of
``--datasets``.  C4 (the evaluation half, disjoint from the calibration half) serves as the validation set for
choosing a setting; WikiText-2 is the test set the README's main job prints.  Results are merged into ``--json``
by variant name, re-read before each variant and before each write, so two runs can share it (a variant already
there is kept unless ``--redo``); ``--threads`` caps the intra-op CPU threads,
so the script can share the machine with a longer run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import _write_atomic, add_common_args, parse_variant  # noqa: E402

from dgq.api import quantize  # noqa: E402
from dgq.config import preset  # noqa: E402
from dgq.data import calibration_samples  # noqa: E402
from dgq.eval.perplexity import perplexity  # noqa: E402
from dgq.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="semicolon list of method[:field=value,...]")
    parser.add_argument("--datasets", default="c4,wikitext2")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=str(ROOT / "results" / "smollm2_float_target_12seq.json"))
    add_common_args(parser, nsamples=12)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {"model": args.label or args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
                "group_size": args.group_size, "windows": args.windows, "device": args.device}
    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() else {**settings, "results": {}, "commands": []}
    clash = {k: (data.get(k), v) for k, v in settings.items() if data.get(k) != v}
    if clash:
        raise SystemExit(f"error: {path} holds results with other settings {clash}")
    command = "python benchmarks/float_target_ridge.py " + " ".join(
        f"'{a}'" if ";" in a or " " in a else a for a in sys.argv[1:])
    if command not in data["commands"]:
        data["commands"].append(command)
    base, tokenizer, _ = load_model(args.model)
    samples = calibration_samples(tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, seed=0, root=args.data_dir)
    datasets = [d for d in args.datasets.split(",") if d]
    for spec in filter(None, args.variants.split(";")):
        if path.exists():  # another run of this script may have added variants meanwhile
            data["results"] = {**json.loads(path.read_text())["results"], **data["results"]}
        if spec in data["results"] and not args.redo:
            print(f"{spec}: kept {data['results'][spec]}")
            continue
        method, overrides = parse_variant(spec)
        model = copy.deepcopy(base)
        seconds, config, ratios = 0.0, None, {}
        if method != "fp":
            config = preset(method, group_size=args.group_size, nsamples=args.nsamples, seqlen=args.seqlen,
                            **overrides)
            start = time.perf_counter()
            result = quantize(model, samples, config, device=args.device, progress=False)
            seconds = time.perf_counter() - start
            # the clip each static scale search chose (1: the max), to see which layers a sample setting moves
            ratios = {r.name: round(r.act_ratio, 4) for r in result.report.layers if r.act_ratio is not None}
        ppl = {d: perplexity(model, tokenizer, d, seqlen=args.seqlen, windows=args.windows,
                             root=args.data_dir).ppl for d in datasets}
        if path.exists():  # merge on write: two runs of this script may share the file (one variant each at a time)
            stored = json.loads(path.read_text())
            data["results"] = {**stored["results"], **data["results"]}
            data["commands"] = list(dict.fromkeys(stored["commands"] + data["commands"]))
        data["results"][spec] = {"ppl": ppl, "quantize_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                                 "config": None if config is None else config.to_dict(),  # presets change
                                 **({"act_ratios": ratios} if ratios else {})}
        print(f"{spec}: " + ", ".join(f"{d} {p:.3f}" for d, p in ppl.items()) + f" ({seconds:.0f} s)", flush=True)
        _write_atomic(path, json.dumps(data, indent=2) + "\n")
        del model


if __name__ == "__main__":
    main()
