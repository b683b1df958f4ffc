"""Tiny random models, a tiny tokenizer and a tiny data folder, all built offline in milliseconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def make_model(family: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A random model of ``family`` with layer widths divisible by 64 and 128 (GQA where it exists), of 2 blocks
    (or ``layers`` for llama, mistral and qwen2)."""
    torch.manual_seed(seed)
    common = {**_COMMON, "num_hidden_layers": layers}
    if layers != 2 and family not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"{family} is built with 2 blocks only")
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))  # q/k/v carry biases
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
    """A data folder with the same file names as ../shared/data, holding short random-word text (and the tiny
    zero-shot items below)."""
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
    return write_zeroshot_dir(root)


# Tiny zero-shot files in the shared data formats (quirks included: an ARC question with 3 choices labelled 1-3 and
# one with 5, JSON-boolean BoolQ answers, WinoGrande answers "1"/"2").  Scored by a model whose every next-token
# distribution is uniform, each choice's log-likelihood is -(characters of " " + choice) * log(VOCAB) under the
# character tokenizer: acc picks the shortest choice and acc_norm (per character) the longest, the first on ties,
# which gives each task a known number of correct answers (ZEROSHOT_CORRECT).
_PIQA = [("Open a jar.", "Twist lid.", "Twist the lid off firmly.", 0),   # acc yes, acc_norm no
         ("Dry hands.", "Use a clean towel on them.", "Use air.", 0),       # acc no, acc_norm yes
         ("Cool tea.", "Wait.", "Add some ice cubes to it.", 1),            # acc no, acc_norm yes
         ("Light room.", "Lamp on.", "Sun out.", 0)]                        # tie: both pick 0, yes
_ARC_EASY = [("Which is a gas?", ["Steam", "Ice cube", "Rock salt", "Iron bar"], "ABCD", "A"),      # yes, no
             ("Which is largest?", ["The Sun", "A pebble", "Moon"], "123", "1"),                     # no, no
             ("What do plants need?", ["Light", "Plastic bags", "Loud noise", "Sand", "Darkness and cold"],
              "ABCDE", "E")]                                                                          # no, yes
_ARC_CHALLENGE = [("Which is a metal?", ["Copper", "Wood", "Glass pane", "Paper sheet"], "ABCD", "B"),  # yes, no
                  ("Which conducts heat best?", ["Silver", "Foam", "Air", "A woolen blanket"], "ABCD", "D")]  # no, yes
_BOOLQ = [("is the sky blue", "The sky looks blue.", True), ("is ice hot", "Ice is cold.", False),
          ("can fish fly", "Most fish swim.", False)]  # acc picks "no": 2 of 3
_HELLASWAG = [("Cooking: A man cracks an egg. he", 2,
               ["stirs it.", "drops the bowl on the floor.", "whisks the egg in a bowl quickly.", "sits."]),  # no, yes
              ("Running: A woman jogs in a park. she", 0,
               ["stops.", "runs past a lake and waves.", "eats a big sandwich slowly.", "jumps over a bench."])]  # yes, no
_WINOGRANDE = [("Tom gave Bob a book because _ was kind.", "Tom", "Bob", "1"),  # both contexts score the same
               ("The cup fell off the table because _ was wobbly.", "cup", "table", "2"),  # continuation: picks 1
               ("Ann asked Sue for help since _ knew the way.", "Ann", "Sue", "2")]
_LAMBADA = ["The cat sat on the mat", "She opened the door slowly"]  # targets " mat", " slowly": 4 and 7 tokens
ZEROSHOT_CORRECT = {"piqa": (4, 2, 3), "arc_easy": (3, 1, 1), "arc_challenge": (2, 1, 1), "boolq": (3, 2, None),
                    "hellaswag": (2, 1, 1), "winogrande": (3, 1, None)}  # task: (items, acc right, acc_norm right)
LAMBADA_TARGET_TOKENS = (4, 7)


def write_zeroshot_dir(root: Path) -> Path:
    """The ``zeroshot/`` folder of a data folder, in the shared files' formats, holding the items above."""
    z = root / "zeroshot"
    for task in ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande", "lambada_openai"):
        (z / task).mkdir(parents=True)

    def jsonl(path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl(z / "piqa" / "valid.jsonl", [{"goal": g, "sol1": a, "sol2": b} for g, a, b, _ in _PIQA])
    (z / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for *_, y in _PIQA))
    for task, file, items in (("arc_easy", "ARC-Easy-Test.jsonl", _ARC_EASY),
                              ("arc_challenge", "ARC-Challenge-Test.jsonl", _ARC_CHALLENGE)):
        jsonl(z / task / file, [{"id": f"q{i}", "question": {"stem": stem, "choices": [
            {"text": t, "label": lab} for t, lab in zip(texts, labels)]}, "answerKey": key}
            for i, (stem, texts, labels, key) in enumerate(items)])
    jsonl(z / "boolq" / "dev.jsonl", [{"question": q, "title": "t", "answer": a, "passage": p} for q, p, a in _BOOLQ])
    (z / "hellaswag" / "hellaswag_val_full.txt").write_text(
        "".join(f"{ctx}\n{gold}\n" + "".join(e + "\n" for e in endings) for ctx, gold, endings in _HELLASWAG))
    jsonl(z / "winogrande" / "dev.jsonl", [{"qID": f"w{i}", "sentence": s, "option1": a, "option2": b, "answer": y}
                                          for i, (s, a, b, y) in enumerate(_WINOGRANDE)])
    (z / "winogrande" / "dev-labels.lst").write_text("".join(f"{y}\n" for *_, y in _WINOGRANDE))
    jsonl(z / "lambada_openai" / "lambada_test.jsonl", [{"text": t} for t in _LAMBADA])
    return root


def assert_loads_back_bit_identical(model: torch.nn.Module, folder: Path, prompt: torch.Tensor) -> None:
    """``model`` saved to ``folder/ckpt`` loads back through ``dgq.load`` and ``from_pretrained`` with the same
    settings, head and embedding classes, state (every tensor's dtype and bits) and logits on ``prompt``; saved again,
    the files are byte-identical."""
    from transformers import AutoModelForCausalLM

    from dgq.checkpoint import SINGLE_FILE, load, save
    from dgq.hf import quant_config

    save(model, folder / "ckpt", tokenizer=make_tokenizer())
    for loaded in (load(folder / "ckpt"), AutoModelForCausalLM.from_pretrained(folder / "ckpt")):
        assert quant_config(loaded) == quant_config(model)
        assert type(loaded.get_output_embeddings()) is type(model.get_output_embeddings())
        assert type(loaded.get_input_embeddings()) is type(model.get_input_embeddings())
        ours, theirs = model.state_dict(), loaded.state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
        with torch.no_grad():
            assert torch.equal(loaded(prompt).logits, model(prompt).logits)
    save(load(folder / "ckpt"), folder / "again", tokenizer=make_tokenizer())
    for name in (SINGLE_FILE, "config.json"):
        assert (folder / "again" / name).read_bytes() == (folder / "ckpt" / name).read_bytes(), name


def load_without_dgq(folder: Path) -> subprocess.CompletedProcess:
    """``AutoModelForCausalLM.from_pretrained(folder)`` in a fresh interpreter that never imports dgq (and asserts it
    did not): what a user without dgq installed would get from a dgq checkpoint."""

    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1]); assert 'dgq' not in sys.modules")
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                          cwd=folder.parent, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
