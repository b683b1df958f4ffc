"""What the int8 LM head and embedding cost on their own: the float model's perplexity with each replaced by its
int8 rows (:mod:`dgq.int8_rows`), no calibration in between.

Why: ``accuracy.py --methods dgq:int8_embedding=true`` measures the embedding through a whole quantization, whose
blocks then calibrate on slightly different rows, so its difference mixes the embedding's own rounding with
calibration noise (a few percent between single runs at 12 sequences, RESULTS.md).  Here the float model is the
only other thing in the path.

    python benchmarks/int8_rows_accuracy.py --model smollm2-135m --windows all --data-dir ../shared/data \
        --variants "float,int8 embedding" --json results/smollm2_int8_rows_fp.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from dgq import api
from dgq.int8_rows import int8_head, int8_input_embedding

VARIANTS = {"float": (), "int8 head": (int8_head,), "int8 embedding": (int8_input_embedding,),
            "int8 head and embedding": (int8_head, int8_input_embedding)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", default="all", help="WikiText-2 windows: a number or 'all'")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--json", default=None, help="write the rows here (temp file, then rename; after each variant)")
    args = parser.parse_args()
    windows = None if args.windows == "all" else int(args.windows)
    base, tokenizer, _ = api.load_any(args.model)
    rows = []
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    for name in names:
        replace = VARIANTS[name]
        model = copy.deepcopy(base)
        errors = {}
        for step in replace:
            module, error = step(model)
            errors[module] = error
        ppl = api.evaluate(model, tokenizer, datasets=["wikitext2"], windows=windows, data_dir=args.data_dir,
                           progress=False).perplexity["wikitext2"]
        rows.append({"model": args.model, "variant": name, "windows": args.windows, "wikitext2": ppl,
                     "relative_squared_error": errors})
        print(f"{name:26s} {ppl:.3f}  {errors}", flush=True)
        if args.json:  # after every variant, so a run stopped early keeps what it measured
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
            tmp.replace(args.json)


if __name__ == "__main__":
    main()
