"""Generation from loaded checkpoints: same tokens as right after quantization, streaming, seeded sampling."""

from __future__ import annotations

import io

import pytest
import torch

from dgq.checkpoint import load, save
from dgq.generate import GenerationSettings, generate, generate_ids
from helpers import make_tokenizer
from test_checkpoint import quantized

GREEDY = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("family,method", [("llama", "w4a8_rtn_dg"), ("opt", "w4a8_rtn")])
def test_loaded_model_generates_the_same_tokens(family, method, tokenizer, tmp_path):
    model = quantized(family, method)
    save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = load(tmp_path / "ckpt")
    ids = tokenizer("the group scale", return_tensors="pt").input_ids
    direct = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(direct[0, ids.shape[1]:], generate_ids(model, tokenizer, "the group scale", GREEDY))
    assert torch.equal(generate_ids(loaded, tokenizer, "the group scale", GREEDY),
                       generate_ids(model, tokenizer, "the group scale", GREEDY))


def test_streamed_text_is_the_generated_text(tokenizer):
    """Pieces written as they come add up to the whole text, and decoding stays in the caller's thread (compiled
    CUDA-graph steps failed in a worker thread)."""
    import threading

    model = quantized("llama", "w4a8_rtn_dg")
    threads, run = [], model.generate
    model.generate = lambda *a, **k: threads.append(threading.current_thread()) or run(*a, **k)
    sink = io.StringIO()
    text = generate(model, tokenizer, "hello", GREEDY, out=sink)
    assert threads == [threading.current_thread()]
    del model.generate
    assert text == sink.getvalue() == tokenizer.decode(generate_ids(model, tokenizer, "hello", GREEDY),
                                                       skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(tokenizer):
    model = quantized("llama", "w4a8_rtn_dg")
    sampling = GenerationSettings(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=7)
    assert generate(model, tokenizer, "hi", sampling) == generate(model, tokenizer, "hi", sampling)


def test_static_cache_decode_gives_the_dynamic_cache_tokens(tokenizer):
    """``compile=True`` (the CUDA default) decodes with transformers' static KV cache; on the CPU transformers does
    not compile it, so this checks the cache path alone: the same greedy tokens as the dynamic cache."""
    model = quantized("llama", "w4a8_rtn_dg")
    static = GenerationSettings(max_new_tokens=6, compile=True)
    assert static.generate_kwargs(torch.device("cpu"))["cache_implementation"] == "static"
    assert "cache_implementation" not in GREEDY.generate_kwargs(torch.device("cpu"))
    assert torch.equal(generate_ids(model, tokenizer, "the group scale", static),
                       generate_ids(model, tokenizer, "the group scale", GREEDY))


@pytest.mark.parametrize("bad,message", [(dict(max_new_tokens=0), "max_new_tokens"),
                                         (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p")])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**bad)


def test_failure_while_generating_is_raised_not_hung(tokenizer, monkeypatch):
    model = quantized("llama", "w4a8_rtn_dg")

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        generate(model, tokenizer, "hi", GREEDY)


def test_cli_generate_streams_and_reports_bad_input(tokenizer, tmp_path, capsys):
    from dgq.cli import main

    model = quantized("llama", "w4a8_rtn_dg")
    save(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert main(["generate", str(tmp_path / "ckpt"), "hello", "--max-new-tokens", "6"]) == 0
    expected = tokenizer.decode(generate_ids(model, tokenizer, "hello", GREEDY), skip_special_tokens=True)
    assert capsys.readouterr().out == f"hello{expected}\n"
    assert main(["generate", str(tmp_path / "ckpt"), "hello", "--temperature", "-1"]) == 2
    assert main(["generate", str(tmp_path / "missing"), "hello"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
