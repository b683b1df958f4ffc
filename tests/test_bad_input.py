"""Bad input, one row each: the CLI answers with exit code 2 and one ``error:`` line naming what is wrong (and the
user's path), and leaves nothing behind.  Every row fails before any calibration, most before any weight is read,
on tiny models, so the whole table runs in seconds (the CLI runs in-process)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dgq.api import quantize
from dgq.checkpoint import save
from dgq.cli import main
from dgq.config import preset
from helpers import make_model, make_tokenizer


@dataclass
class Env:
    """Paths a row builds its command line from; ``out`` must not exist after the command."""

    tmp: Path
    model: Path
    data: Path
    checkpoint: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"


def _save_model(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _broken(env: Env, where: str) -> str:
    """The tiny model with one NaN in the tensor ``where`` (a state-dict key), saved."""
    model = make_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        model.state_dict()[where].view(-1)[3] = float("nan")
    return str(_save_model(model, env.tmp / "broken"))


def _foreign(env: Env, method: str) -> str:
    path = _save_model(make_model("llama"), env.tmp / f"{method}-model")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _gguf(env: Env, truncate: bool) -> str:
    import gguf

    path = env.tmp / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"this is not a GGUF file at all\n" * 8)
    return str(path)


def _file(env: Env, name: str, content: bytes | str) -> str:
    path = env.tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _data_with(env: Env, relative: str, content: bytes) -> str:
    import shutil

    root = env.tmp / "data-copy"
    shutil.copytree(env.data, root)
    (root / relative).write_bytes(content)
    return str(root)


def _small_vocab(env: Env) -> str:
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return str(_save_model(LlamaForCausalLM(config), env.tmp / "small-vocab"))


def _corrupt_checkpoint(env: Env) -> str:
    import shutil

    path = env.tmp / "corrupt-ckpt"
    shutil.copytree(env.checkpoint, path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return str(path)


def _quantize(model: str, *extra: str) -> Callable[[Env], list[str]]:
    """A ``quantize`` command line; ``{model}``, ``{data}``, ``{tmp}`` and ``{out}`` are filled from the Env.
    ``extra`` comes last, so a flag given there overrides the default before it (argparse keeps the last)."""
    def build(env: Env) -> list[str]:
        fill = {"model": str(env.model), "data": str(env.data), "tmp": str(env.tmp), "out": str(env.out)}
        return [a.format(**fill) for a in ("quantize", model, "--out", "{out}", "--nsamples", "2", "--seqlen", "32",
                                           "--device", "cpu", "--data-dir", "{data}", *extra)]
    return build


def _with(make: Callable[[Env], str], *extra: str, command: str = "quantize") -> Callable[[Env], list[str]]:
    """A command line whose model (or, for ``--calib``/``--data-dir``, whose file) ``make`` builds first."""
    def build(env: Env) -> list[str]:
        made = make(env)
        if command == "eval":
            return ["eval", made, "--seqlen", "32", "--windows", "1", "--data-dir", str(env.data), *extra]
        if extra and extra[-1] in ("--calib", "--data-dir"):
            return _quantize("{model}", *extra, made)(env)
        return _quantize(made, *extra)(env)
    return build


# (id, command line builder, text the one error line must contain)
CASES: list[tuple[str, Callable[[Env], list[str]], str]] = [
    ("group-size-0", _quantize("{model}", "--group-size", "0"), "--group-size must be >= 2, got 0"),
    ("group-size-negative", _quantize("{model}", "--group-size", "-1"), "--group-size must be >= 2, got -1"),
    ("group-size-odd", _quantize("{model}", "--group-size", "7"), "group size 7 does not divide in_features 128"),
    ("group-size-indivisible", _quantize("{model}", "--group-size", "96"),
     "group size 96 does not divide in_features 128"),
    ("nsamples-0", _quantize("{model}", "--nsamples", "0"), "--nsamples must be >= 1, got 0"),
    ("nsamples-negative", _quantize("{model}", "--nsamples", "-1"), "--nsamples must be >= 1, got -1"),
    ("seqlen-0", _quantize("{model}", "--seqlen", "0"), "--seqlen must be >= 1, got 0"),
    ("seqlen-beyond-positions", _quantize("{model}", "--seqlen", "64000"),
     "--seqlen 64000 exceeds the 256 positions of this model"),
    ("windows-0", _quantize("{model}", "--eval", "wikitext2", "--windows", "0"), "--windows must be >= 1, got 0"),
    ("calib-batch-0", _quantize("{model}", "--calib-batch", "0"), "--calib-batch must be >= 1, got 0"),
    ("percentile-0", _quantize("{model}", "--percentile", "0"), "percentile (top % of channels) must be in (0, 50)"),
    ("clip-min-0", _quantize("{model}", "--clip-min", "0"), "clip_min in (0, 1]"),
    ("unknown-dataset", _quantize("{model}", "--eval", "wikitext3"), "unknown dataset 'wikitext3'"),
    ("no-cuda", _quantize("{model}", "--device", "cuda"), "CUDA is not available"),
    ("unknown-device", _quantize("{model}", "--device", "tpu9"), "unknown device 'tpu9'"),
    ("calib-missing", _quantize("{model}", "--calib", "{tmp}/nope.txt"), "calibration file {tmp}/nope.txt does not exist"),
    ("calib-binary", _with(lambda e: _file(e, "calib.bin", b"\x89PNG\r\n\x1a\n\xfd\xfe" * 50), "--calib"),
     "calibration file {tmp}/calib.bin is not UTF-8 text (byte 0x89 at offset 0)"),
    ("calib-nul-bytes", _with(lambda e: _file(e, "calib.txt", b"text\x00\x00more text"), "--calib"),
     "calibration file {tmp}/calib.txt is not a text file (it holds NUL bytes)"),
    ("calib-empty", _with(lambda e: _file(e, "empty.txt", "  \n"), "--calib"), "calibration file {tmp}/empty.txt holds no text"),
    ("calib-bad-jsonl", _with(lambda e: _file(e, "c.jsonl", '{"text": "ok"}\n{"txt": 1}\n'), "--calib"),
     "calibration file {tmp}/c.jsonl, line 2: not a json object with a 'text' field"),
    ("calib-directory", _with(lambda e: str(e.tmp), "--calib"), "calibration file {tmp} is a directory"),
    ("data-dir-missing", _quantize("{model}", "--eval", "ptb", "--data-dir", "{tmp}/nodata"),
     "ptb evaluation file not found at {tmp}/nodata/ptb/ptb.test.txt"),
    ("eval-file-binary", _with(lambda e: _data_with(e, "wikitext-2-raw/wiki.test.raw", b"\xff\xfe\x00\x01" * 9),
                               "--eval", "wikitext2", "--data-dir"),
     "wikitext2 evaluation file {tmp}/data-copy/wikitext-2-raw/wiki.test.raw is not"),
    ("out-exists", _quantize("{model}", "--out", "{tmp}/existing"), "output directory {tmp}/existing already exists"),
    ("out-unwritable", _quantize("{model}", "--out", "{tmp}/a-file/out"),
     "cannot write the output directory {tmp}/a-file/out: {tmp}/a-file is a file"),
    ("model-missing", _quantize("{tmp}/no-such-model"), "model path {tmp}/no-such-model does not exist"),
    ("model-not-hf-dir", _quantize("{tmp}"), "is not a Hugging Face model directory (no config.json)"),
    ("gguf-truncated", _with(lambda e: _gguf(e, truncate=True)), "GGUF file {tmp}/tiny.gguf is truncated or corrupt"),
    ("gguf-not-gguf", _with(lambda e: _gguf(e, truncate=False)), "GGUF file {tmp}/tiny.gguf is truncated or corrupt"),
    ("nan-embedding", _with(lambda e: _broken(e, "model.embed_tokens.weight")),
     "model weight model.embed_tokens.weight holds 1 NaN/Inf value(s)"),
    ("nan-norm", _with(lambda e: _broken(e, "model.layers.1.input_layernorm.weight")),
     "model weight model.layers.1.input_layernorm.weight holds 1 NaN/Inf value(s)"),
    ("nan-head", _with(lambda e: _broken(e, "lm_head.weight")), "model weight lm_head.weight holds 1 NaN/Inf value(s)"),
    ("nan-linear", _with(lambda e: _broken(e, "model.layers.0.mlp.down_proj.weight")),
     "model weight model.layers.0.mlp.down_proj.weight holds 1 NaN/Inf value(s)"),
    ("awq-model-quantize", _with(lambda e: _foreign(e, "awq")), "is a 'awq' checkpoint, not a dgq checkpoint"),
    ("awq-model-eval", _with(lambda e: _foreign(e, "awq"), command="eval"), "is a 'awq' checkpoint, not a dgq checkpoint"),
    ("gptq-model-eval", _with(lambda e: _foreign(e, "gptq"), command="eval"), "is a 'gptq' checkpoint, not a dgq checkpoint"),
    ("vocab-smaller-than-tokenizer", _with(_small_vocab, command="eval"),
     "the tokenizer has 96 tokens but the model's vocabulary has 64"),
    ("eval-windows-0", lambda e: ["eval", str(e.checkpoint), "--windows", "0", "--data-dir", str(e.data)],
     "--windows must be >= 1, got 0"),
    ("eval-no-datasets", lambda e: ["eval", str(e.checkpoint), "--datasets", ",", "--data-dir", str(e.data)],
     "--datasets is empty"),
    ("eval-seqlen-beyond-positions", lambda e: ["eval", str(e.checkpoint), "--seqlen", "4096", "--data-dir", str(e.data)],
     "--seqlen 4096 exceeds the 256 positions of this model"),
    ("eval-seqlen-beyond-text", lambda e: ["eval", str(e.checkpoint), "--seqlen", "200", "--data-dir",
                                           _data_with(e, "wikitext-2-raw/wiki.test.raw", b"short text\n")],
     "--seqlen 200 is longer than the whole wikitext2 evaluation text"),
    ("eval-corrupt-checkpoint", _with(_corrupt_checkpoint, command="eval"), "model.safetensors is missing, corrupt or truncated"),
    ("generate-zero-tokens", lambda e: ["generate", str(e.checkpoint), "hi", "--max-new-tokens", "0"],
     "max_new_tokens must be >= 1, got 0"),
    ("generate-bad-top-p", lambda e: ["generate", str(e.checkpoint), "hi", "--temperature", "1", "--top-p", "0"],
     "top_p must be in (0, 1], got 0.0"),
    ("export-not-a-checkpoint", lambda e: ["export", str(e.model), "--format", "fake-fp16", "--out", str(e.out)],
     "has no dgq quantization_config"),
]


# Rows whose fault is in the weights themselves: only these may read them before failing.
NEEDS_WEIGHTS = {"nan-embedding", "nan-norm", "nan-head", "nan-linear", "eval-corrupt-checkpoint"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_model(make_model("llama"), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, data_dir) -> Path:
    model = make_model("llama")
    ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, ids, preset("w4a8_rtn_dg", group_size=64), device="cpu", progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-dgq"
    save(model, path, tokenizer=make_tokenizer())
    return path


def test_the_table_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(build, message, model_dir, checkpoint_dir, data_dir, tmp_path, capsys, monkeypatch, request):
    if "CUDA is not available" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if request.node.callspec.id not in NEEDS_WEIGHTS:  # validation must come before minutes of loading
        def no_weights(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            raise AssertionError("weights were loaded before the bad input was found")
        monkeypatch.setattr("dgq.loading.load_weights", no_weights)
        monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)  # checkpoints
    env = Env(tmp_path, model_dir, data_dir, checkpoint_dir)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("precious")
    (tmp_path / "a-file").write_text("a file where a folder is asked for")
    argv = build(env)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], err
    assert message.format(tmp=tmp_path) in lines[-1], err
    assert not env.out.exists()
    assert (tmp_path / "existing" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing is left behind, no hidden temp folder"
    assert not any(p.name.startswith(".") for p in (tmp_path / "a-file").parent.iterdir())
    assert os.listdir(tmp_path / "existing") == ["keep.txt"]
