"""What an int8 KV cache would cost in accuracy: perplexity with keys and values rounded to int8 before attention.

Decode at batch 32 is bound by reading the fp16 KV cache (BENCHMARKS.md, end to end): halving its bytes is the one
path to the batch-32 target.  Before building such a cache, this measures the price on a real model: every key and
value vector (per token, per KV head) is rounded symmetrically to int8 with its own fp32 scale, ``absmax / 127``, then
dequantized (:func:`dgq.kv_cache.quantize_rows`, what the int8 cache stores), inside a transformers attention function
registered beside SDPA; everything else is the model's own path.  It prints WikiText-2 perplexity (GPTQ protocol,
first ``--windows`` windows) with and without, for each model.

    python benchmarks/kv8_accuracy.py --models smollm2-135m,runs/smollm2-dgq --windows 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dgq.kv_cache import dequantize_rows, quantize_rows

NAME = "kv8_fake"


def fake_int8(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to int8 per vector of its last dimension as :mod:`dgq.kv_cache` stores it, and dequantized."""
    return dequantize_rows(*quantize_rows(t), t.dtype)


def kv8_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """SDPA on int8-rounded keys and values (``key``/``value`` ``[B, Hkv, L, D]``: one scale per token and head)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, fake_int8(key), fake_int8(value), attention_mask, **kwargs)


def main() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from dgq import api

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m", help="comma list: model specs or dgq checkpoints")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    AttentionInterface.register(NAME, kv8_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    rows = []
    for spec in args.models.split(","):
        model, tokenizer, _ = api.load_any(spec)
        for attention in ("sdpa", NAME):
            model.set_attn_implementation(attention)
            ppl = api.evaluate(model, tokenizer, datasets=["wikitext2"], windows=args.windows,
                               data_dir=args.data_dir, progress=False).perplexity["wikitext2"]
            rows.append({"model": spec, "attention": attention, "windows": args.windows, "wikitext2": ppl})
            print(f"{spec:24s} {'int8 KV' if attention == NAME else 'fp KV':8s} {ppl:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
