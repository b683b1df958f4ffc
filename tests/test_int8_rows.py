"""``int8_head`` and ``int8_embedding`` (:mod:`dgq.int8_rows`): the format's rounding, the kernel in Triton's CPU
interpreter against the exact product, bit-identical checkpoint round trips (``dgq.load`` and ``from_pretrained``),
a transformers without dgq refusing the codes, what the options change, the exports, and bad input refused."""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import (as tests/test_kernels.py)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dgq.api import quantize  # noqa: E402
from dgq import api  # noqa: E402
from dgq.checkpoint import SINGLE_FILE, CheckpointError, load, save  # noqa: E402
from dgq.cli import main  # noqa: E402
from dgq.config import ConfigError, preset  # noqa: E402
from dgq.export import export  # noqa: E402
from dgq.formats import FormatError  # noqa: E402
from dgq.int8_rows import Int8Embedding, Int8Linear, quantize_rows_int8  # noqa: E402
from dgq.nn import QuantLinear  # noqa: E402
from helpers import (  # noqa: E402
    VOCAB, assert_loads_back_bit_identical, load_without_dgq, make_model, make_tokenizer,
)

PROMPT = torch.arange(3, 3 + 2 * 12).reshape(2, 12) % VOCAB
BOTH = ("int8_head", "int8_embedding")


@lru_cache(maxsize=None)
def quantized(family: str, options: tuple[str, ...]) -> torch.nn.Module:
    """A tiny model quantized by the default method with ``options`` on, once per session (tests must not modify
    it)."""
    model = make_model(family)
    samples = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    config = preset("dgq", group_size=64, nsamples=4, seqlen=32, clip_grid=4, s1_grid=4,
                    **{name: True for name in options})
    quantize(model, samples, config, device="cpu", progress=False)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_round_to_the_nearest_code_of_the_stored_scale(dtype):
    weight = (torch.randn(40, 96) * 0.05).to(dtype)
    weight[3] = 0  # a zero row: zero codes, a positive scale
    weight[5, 7] = -1.0  # a row's extreme is -127, never -128
    codes, scale = quantize_rows_int8(weight)
    assert codes.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (40,)
    assert int(codes.min()) >= -127 and int(codes[5, 7]) == -127 and not codes[3].any() and scale[3] > 0
    expect = torch.round(weight.float() / scale.float()[:, None]).clamp(-127, 127)
    assert torch.equal(codes.float(), expect)
    step = scale.float()[:, None]
    assert ((codes.float() * step - weight.float()).abs() <= step * (0.5 + 128 * torch.finfo(dtype).eps)).all()


def test_modules_compute_their_definition():
    linear = torch.nn.Linear(96, 40, bias=False)
    head = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 96)
    expect = ((x.reshape(6, 96) @ head.codes.float().t()) * head.scale).reshape(2, 3, 40)
    assert torch.equal(head(x), expect)
    embedding = Int8Embedding.from_weight(torch.nn.Embedding(40, 96).weight.detach().half())
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    rows = embedding(ids)
    assert rows.dtype == torch.float16 and torch.equal(rows, embedding.dequantize()[ids])
    assert torch.equal(embedding.dequantize(), (embedding.codes.float() * embedding.scale.float()[:, None]).half())
    assert (head.in_features, head.out_features) == (96, 40) and head(x).shape == (2, 3, 40)
    assert (embedding.num_embeddings, embedding.embedding_dim) == (40, 96)
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_linear(torch.nn.Linear(96, 40))


def test_the_reference_head_in_chunks_is_the_whole_product(monkeypatch):
    """The CPU head widens its codes a chunk of rows at a time; the products are the whole matrix's to float32
    rounding (each output is the same dot product; BLAS may order its sum by the chunk's width)."""
    head = Int8Linear.from_linear(torch.nn.Linear(96, 40, bias=False))
    x = torch.randn(5, 96)
    whole = head(x)
    monkeypatch.setattr(Int8Linear, "REFERENCE_CHUNK_ROWS", 16)  # chunks of 16, 16 and 8 rows
    torch.testing.assert_close(head(x), whole, rtol=1e-5, atol=1e-6)
    assert head(x.half()).dtype == torch.float16


def test_format_is_validated():
    head = Int8Linear.from_linear(torch.nn.Linear(96, 40, bias=False))
    head.validate("h")
    head.codes[0, 0] = -128
    with pytest.raises(FormatError, match="h: a code is -128"):
        head.validate("h")
    head.codes[0, 0] = 0
    head.scale[1] = float("nan")
    with pytest.raises(FormatError, match="NaN"):
        head.validate("h")


# (M, N, K, config): the rule's regimes, tails of M, N and K, several K tiles
KERNEL_CASES = [(1, 96, 200, None), (3, 130, 512, None), (17, 64, 256, None), (40, 70, 64, None),
                (5, 64, 384, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=3))]


@pytest.mark.parametrize("m,n,k,config", KERNEL_CASES)
@pytest.mark.parametrize("magic", [False, True])
def test_kernel_equals_the_exact_product(m, n, k, config, magic):
    """Integer-valued activations make every partial sum exact in fp32, so the kernel must give the float64
    product's bits whatever its summation order; ``magic`` is the widening the GPU runs for fp16."""
    from dgq.kernels.int8_rows import int8_rows_matmul

    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randint(-8, 9, (m, k), generator=gen).half()
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    q[0] = 127  # the widening's ends
    q[-1] = -127
    scale = (torch.rand(n, generator=gen) + 0.5).half()
    exact = ((x.double() @ q.double().t()).float() * scale.float()).half()
    assert torch.equal(int8_rows_matmul(x, q, scale, config, magic), exact)


def test_kernel_refuses_what_it_cannot_compute():
    from dgq.kernels.int8_rows import int8_rows_matmul

    q, s = torch.zeros(64, 32, dtype=torch.int8), torch.ones(64).half()
    with pytest.raises(ValueError, match="fp16 or bf16"):
        int8_rows_matmul(torch.zeros(1, 32), q, s.float())
    with pytest.raises(ValueError, match="magic widening is for fp16"):
        int8_rows_matmul(torch.zeros(1, 32, dtype=torch.bfloat16), q, s.bfloat16(), magic=True)
    with pytest.raises(ValueError, match="x \\[1, 16\\]"):
        int8_rows_matmul(torch.zeros(1, 16).half(), q, s)


@pytest.mark.parametrize("family", ["llama", "opt"])  # OPT's head is tied to its embedding
def test_round_trip_is_bit_identical(family, tmp_path):
    model = quantized(family, BOTH)
    assert type(model.get_output_embeddings()) is Int8Linear and type(model.get_input_embeddings()) is Int8Embedding
    assert not model.config.tie_word_embeddings
    assert_loads_back_bit_identical(model, tmp_path, PROMPT)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["settings"]["int8_head"] and config["settings"]["int8_embedding"]
    assert config["modules"]["lm_head"]["type"] == "int8_linear"


def test_int8_codes_without_dgq_are_refused_not_read_as_floats(tmp_path):
    """The codes are stored transposed under ``weight`` ([dim, vocab] int8): a fresh interpreter that never
    imports dgq builds float modules and fails their size check, instead of loading codes as float weights."""
    save(quantized("llama", BOTH), tmp_path / "ckpt", tokenizer=make_tokenizer())
    proc = load_without_dgq(tmp_path / "ckpt")
    assert proc.returncode != 0
    assert "model.embed_tokens.weight" in proc.stderr and "lm_head.weight" in proc.stderr
    assert "MISMATCH" in proc.stderr


@pytest.mark.parametrize("option,keys", [
    ("int8_head", {"lm_head.weight", "lm_head.codes", "lm_head.scale"}),
    ("int8_embedding", {"model.embed_tokens.weight", "model.embed_tokens.codes", "model.embed_tokens.scale"}),
])
def test_each_option_changes_only_its_matrix(option, keys):
    """Both are applied after calibration and need no statistics: every other tensor is what the run without
    them gives."""
    off, on = quantized("llama", ()).state_dict(), quantized("llama", (option,)).state_dict()
    changed = {k for k in off.keys() | on.keys() if k not in off or k not in on or not torch.equal(off[k], on[k])}
    assert changed == keys


def test_both_export_formats_write_the_rows_dequantized(tmp_path):
    model = quantized("llama", BOTH)
    head, embedding = model.lm_head.dequantize().half(), model.get_input_embeddings().dequantize().half()
    out = export(model, tmp_path / "fp16", "fake-fp16", tokenizer=make_tokenizer())
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(plain.lm_head.weight, head) and torch.equal(plain.get_input_embeddings().weight, embedding)
    ct = export(model, tmp_path / "ct", "compressed-tensors", tokenizer=make_tokenizer())
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert "lm_head" in config["ignore"]
    from safetensors.torch import load_file

    tensors = load_file(next(ct.glob("*.safetensors")))
    assert torch.equal(tensors["lm_head.weight"], head) and torch.equal(tensors["model.embed_tokens.weight"], embedding)
    assert "model.layers.0.self_attn.q_proj.weight_packed" in tensors


@pytest.mark.parametrize("overrides,message", [
    (dict(int8_head=True, quantize_head=True), "int8_head excludes quantize_head"),
    (dict(int8_embedding=True, quantize_embedding=True), "int8_embedding excludes quantize_embedding"),
])
def test_each_matrix_takes_one_format(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preset("dgq", **overrides)
    with pytest.raises(ConfigError, match="need a weight format"):
        preset("fp", int8_head=True)


def test_a_model_the_options_cannot_serve_is_refused_untouched():
    model = make_model("gemma3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="int8_embedding replaces a plain nn.Embedding"):
        quantize(model, samples, preset("dgq", group_size=64, nsamples=2, seqlen=32, int8_embedding=True),
                 device="cpu", progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_checkpoint_with_a_broken_code_is_refused(tmp_path):
    model = quantized("llama", ("int8_head",))
    save(model, tmp_path / "ckpt", tokenizer=make_tokenizer())
    from safetensors.torch import load_file, save_file

    file = tmp_path / "ckpt" / SINGLE_FILE
    tensors = load_file(file)
    tensors["lm_head.weight"][0, 0] = -128
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head: a code is -128"):
        load(tmp_path / "ckpt")


def test_cli_flags_and_help(model_dir, tmp_path, data_dir, capsys):
    common = ["--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--data-dir", str(data_dir)]
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "q"), "--int8-head", "--int8-embedding",
                 *common]) == 0
    loaded = load(tmp_path / "q")
    assert type(loaded.lm_head) is Int8Linear and type(loaded.get_input_embeddings()) is Int8Embedding
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    capsys.readouterr()
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "bad"), "--int8-head", "--quantize-head",
                 *common]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "int8_head excludes quantize_head" in err[0] and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--int8-head" in text and "--no-int8-embedding" in text and "0.244 -> 0.122 GiB" in text


def test_cli_default_is_both_int8_where_the_model_allows(model_dir, tmp_path, data_dir, capsys):
    """No head or embedding option: both int8 (said in the log line); ``--no-int8-*`` or any option named: exactly
    what is named; a model that cannot take both (Gemma3's scaled embedding) keeps both in float."""
    common = ["--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--data-dir", str(data_dir)]
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "d"), *common]) == 0
    assert "head/embedding int8/int8 (default)" in capsys.readouterr().out
    loaded = load(tmp_path / "d")
    assert type(loaded.lm_head) is Int8Linear and type(loaded.get_input_embeddings()) is Int8Embedding
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "f"), "--no-int8-head", "--no-int8-embedding",
                 *common]) == 0
    assert "head/embedding float/float\n" in capsys.readouterr().out
    loaded = load(tmp_path / "f")
    assert type(loaded.lm_head) is torch.nn.Linear and type(loaded.get_input_embeddings()) is torch.nn.Embedding
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "h"), "--int8-head", *common]) == 0
    assert "head/embedding int8/float\n" in capsys.readouterr().out
    assert api.default_head_embedding(make_model("gemma3")) == {"int8_head": False, "int8_embedding": False}
    assert api.default_head_embedding(make_model("llama")) == {"int8_head": True, "int8_embedding": True}


def test_e2e_gives_dgq_the_rows_and_keeps_fp16_elsewhere():
    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import e2e

    model = e2e.convert(make_model("llama").half(), "dgq_dynamic", fuse=False, int8_head=True, int8_embedding=True)
    assert type(model.lm_head) is Int8Linear and type(model.get_input_embeddings()) is Int8Embedding
    assert model.lm_head.scale.dtype == torch.float16
    w8a8 = e2e.convert(make_model("llama").half(), "w8a8", int8_head=True, int8_embedding=True)
    assert type(w8a8.lm_head) is torch.nn.Linear and type(w8a8.get_input_embeddings()) is torch.nn.Embedding
