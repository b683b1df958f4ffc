"""Tiny random models, a tiny tokenizer and a tiny data folder, all built offline in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
)

FAMILIES = ("llama", "qwen2", "mistral", "opt", "gemma3")
VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-block random model of ``family`` with layer widths divisible by 64 and 128 (GQA where it exists)."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_COMMON))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_COMMON))  # q/k/v carry biases
    elif family == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**_COMMON, head_dim=32, sliding_window=16,
                                                   layer_types=["sliding_attention", "full_attention"]))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=256,
                                         word_embed_proj_dim=128, do_layer_norm_before=True))
    else:
        raise ValueError(family)
    with torch.no_grad():  # random norms, so smoothing and quantization see uneven channels as in real models
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return model.eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer over a fixed alphabet (ids < VOCAB), so any text tokenizes offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = [chr(c) for c in range(32, 127)]
    vocab = {"<unk>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def write_data_dir(root: Path, words: int = 3000) -> Path:
    """A data folder with the same file names as ../shared/data, holding short random-word text."""
    g = torch.Generator().manual_seed(1)
    pool = ["alpha", "beta", "gamma", "delta", "quant", "group", "scale", "token", "model", "layer"]

    def text(n: int) -> str:
        return " ".join(pool[int(i)] for i in torch.randint(0, len(pool), (n,), generator=g))

    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "ptb").mkdir()
    (root / "c4").mkdir()
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(text(50) + "\n" for _ in range(words // 50)))
    (root / "ptb" / "ptb.test.txt").write_text("".join(text(20) + "\n" for _ in range(words // 20)))
    for name in ("c4-validation.eval.jsonl", "c4-validation.calib.jsonl"):
        with (root / "c4" / name).open("w") as f:
            for _ in range(20):
                f.write(json.dumps({"text": text(150), "url": "u", "timestamp": "t"}) + "\n")
    return root
