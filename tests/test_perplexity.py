"""Perplexity follows the GPTQ protocol: one tokenization, non-overlapping windows, mean NLL over windows."""

import math

import torch
import torch.nn.functional as F

from dgq.data import load_eval_text
from dgq.eval.perplexity import perplexity
from helpers import make_model


def test_matches_hand_computed_nll(tokenizer, data_dir):
    model = make_model("llama")
    ids = tokenizer(load_eval_text("ptb", data_dir), return_tensors="pt").input_ids[0]
    seqlen = 64
    n = ids.numel() // seqlen
    with torch.no_grad():
        nlls = [F.cross_entropy(model(ids[i * seqlen:(i + 1) * seqlen][None]).logits[0, :-1],
                                ids[i * seqlen + 1:(i + 1) * seqlen]) for i in range(n)]
    expect = math.exp(float(torch.stack(nlls).mean()))
    result = perplexity(model, tokenizer, "ptb", seqlen=seqlen, root=data_dir, progress=False)
    assert result.windows == n
    assert math.isclose(result.ppl, expect, rel_tol=1e-5)


def test_window_limit_and_clamp(tokenizer, data_dir):
    model = make_model("llama")
    two = perplexity(model, tokenizer, "wikitext2", seqlen=64, windows=2, root=data_dir, progress=False)
    assert two.windows == 2
    many = perplexity(model, tokenizer, "wikitext2", seqlen=512, windows=10_000, root=data_dir, progress=False)
    assert many.windows == len(tokenizer(load_eval_text("wikitext2", data_dir)).input_ids) // 512
