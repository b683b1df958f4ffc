"""Perplexity against NLLs computed by hand, window counting (C4 cap, clamping), and the token cache."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dgq.eval.perplexity as ppl_module
from dgq.eval.perplexity import C4_MAX_WINDOWS, perplexity, tokenize_eval
from helpers import VOCAB, make_model, make_tokenizer


class RepeatModel(nn.Module):
    """Predicts "the next token repeats this one" with logit ``a``: p(repeat) = e^a / (e^a + V - 1)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, ids, use_cache=False):
        return SimpleNamespace(logits=nn.functional.one_hot(ids, VOCAB).float() * self.a)


def _write_wikitext(root, rows):
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(r + "\n" for r in rows))
    return root


def test_matches_hand_computed_nll(tokenizer, tmp_path):
    root = _write_wikitext(tmp_path, ["aab", "bba"])  # joined: "aab\n\n\nbba\n" -> a a b ? ? ? b b a ?
    ids = tokenizer("aab\n\n\nbba\n").input_ids
    seqlen, a = 5, 2.0
    log_repeat = a - math.log(math.exp(a) + VOCAB - 1)
    log_other = -math.log(math.exp(a) + VOCAB - 1)
    window_means = []
    for w in range(len(ids) // seqlen):
        chunk = ids[w * seqlen:(w + 1) * seqlen]
        nll = [-(log_repeat if x == y else log_other) for x, y in zip(chunk, chunk[1:])]
        window_means.append(sum(nll) / len(nll))
    expected = sum(window_means) / len(window_means)
    result = perplexity(RepeatModel(a), tokenizer, "wikitext2", seqlen=seqlen, root=root, progress=False)
    assert result.windows == 2 and result.seqlen == seqlen and result.note == ""
    assert result.nll == pytest.approx(expected, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-6)


def test_matches_hf_loss_of_a_real_model(tokenizer, data_dir):
    model = make_model("llama")
    result = perplexity(model, tokenizer, "ptb", seqlen=32, windows=3, root=data_dir, progress=False)
    ids = tokenize_eval(tokenizer, "ptb", data_dir)[:96].view(3, 32)
    with torch.no_grad():
        losses = [model(row[None], labels=row[None]).loss for row in ids]
    assert result.nll == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


def test_c4_is_capped_at_256_windows(tokenizer, data_dir):
    assert tokenize_eval(tokenizer, "c4", data_dir).numel() // 8 > C4_MAX_WINDOWS
    result = perplexity(RepeatModel(0.0), tokenizer, "c4", seqlen=8, root=data_dir, progress=False)
    assert result.windows == C4_MAX_WINDOWS
    assert result.ppl == pytest.approx(VOCAB)  # uniform prediction


def test_windows_beyond_available_are_clamped_with_a_note(tokenizer, data_dir):
    available = tokenize_eval(tokenizer, "ptb", data_dir).numel() // 512
    result = perplexity(RepeatModel(0.0), tokenizer, "ptb", seqlen=512, windows=10_000, root=data_dir,
                        progress=False)
    assert result.windows == available
    assert result.note == f"asked for 10000 windows of ptb, only {available} available; evaluated {available}"


@pytest.mark.parametrize("windows, seqlen, message", [(0, 8, "windows must be at least 1"),
                                                      (None, 10**7, "fewer than one window of 10000000")])
def test_bad_window_requests(tokenizer, data_dir, windows, seqlen, message):
    with pytest.raises(ValueError, match=message):
        perplexity(RepeatModel(0.0), tokenizer, "ptb", seqlen=seqlen, windows=windows, root=data_dir, progress=False)


def test_token_ids_are_cached_per_tokenizer_content(tokenizer, data_dir, monkeypatch):
    first = tokenize_eval(tokenizer, "wikitext2", data_dir)
    monkeypatch.setattr(ppl_module, "load_eval_text", lambda *a: pytest.fail("tokenized again"))
    assert tokenize_eval(make_tokenizer(), "wikitext2", data_dir) is first  # same tokenizer, new object
