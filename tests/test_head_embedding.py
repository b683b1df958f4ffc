"""``quantize_head`` and ``quantize_embedding`` (issue 12's peak memory): the 4-bit embedding's format, exact
checkpoint round trips (``dgq.load`` and ``from_pretrained``), tied models, what the options leave untouched, the
export and e2e paths, and bad input refused before any work."""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from dgq.api import quantize
from dgq.checkpoint import CheckpointError, load, save
from dgq.cli import main
from dgq.config import ConfigError, QuantConfig, preset
from dgq.embedding import QuantEmbedding, pack_rows, quantize_embedding_matrix, unpack_rows
from dgq.export import ExportError, export
from dgq.formats import FormatError
from dgq.nn import QuantLinear
from helpers import VOCAB, assert_loads_back_bit_identical, load_without_dgq, make_model, make_tokenizer

PROMPT = torch.arange(3, 3 + 2 * 12).reshape(2, 12) % VOCAB
HEAD, EMB, BOTH = (("quantize_head",), ("quantize_embedding",), ("quantize_head", "quantize_embedding"))


@lru_cache(maxsize=None)
def quantized(family: str, method: str, options: tuple[str, ...]) -> torch.nn.Module:
    """A tiny model quantized with ``options`` on, built once per session (tests must not modify it)."""
    model = make_model(family)
    samples = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    config = preset(method, group_size=64, nsamples=4, seqlen=32, clip_grid=4, s1_grid=4,
                    **{name: True for name in options})
    quantize(model, samples, config, device="cpu", progress=False)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def test_rows_pack_and_unpack_exactly():
    u4 = torch.randint(0, 16, (5, 3, 8), dtype=torch.uint8)
    packed = pack_rows(u4)
    assert packed.shape == (5, 3, 4) and torch.equal(packed[0, 0, 0], u4[0, 0, 0] | (u4[0, 0, 1] << 4))
    assert torch.equal(unpack_rows(packed), u4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_embedding_rows_are_its_dequantized_matrix_in_the_model_dtype(dtype):
    weight = (torch.randn(40, 128) * 0.05).to(dtype)
    module = quantize_embedding_matrix(weight, QuantConfig(group_size=64, search=False))
    assert module.weight.dtype == torch.uint8 and module.weight.shape == (40, 64) and module.scale.dtype == dtype
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    rows = module(ids)
    assert rows.dtype == dtype and rows.shape == (2, 3, 128)
    assert torch.equal(rows, module.dequantize()[ids])
    # the definition, element by element: (u - zp) * scale in float32, rounded once to the dtype
    u = module.codes_unpacked().float().reshape(40, 2, 64)
    expect = ((u - module.zp.float()[..., None]) * module.scale.float()[..., None]).reshape(40, 128).to(dtype)
    assert torch.equal(module.dequantize(), expect)
    # nearest rounding on the stored scale: within half a step, plus what rounding the scale to the dtype may clip
    # at a group's ends (up to 15 codes times its rounding) and rounding the row to the dtype
    eps = torch.finfo(dtype).eps
    step = module.scale.float().repeat_interleave(64, dim=1)
    bound = step * (0.5 + 16 * eps) + weight.float().abs() * eps + 1e-7
    assert ((module.dequantize().float() - weight.float()).abs() <= bound).all()
    half = module.half()
    assert half.scale.dtype == torch.float16 and half(ids).dtype == torch.float16


def test_searched_embedding_clipping_never_loses_to_rounding():
    weight = torch.randn(64, 128) * 0.05
    weight[::7, 5] = 1.0  # outliers make clipping worth it in their groups
    rtn = quantize_embedding_matrix(weight, QuantConfig(group_size=64, search=False))
    searched = quantize_embedding_matrix(weight, QuantConfig(group_size=64, clip_grid=8))
    err = lambda m: (m.dequantize() - weight).pow(2).reshape(64, 2, 64).sum(-1)  # noqa: E731 - per group
    assert (err(searched) <= err(rtn) * (1 + 1e-5) + 1e-12).all()
    assert err(searched).sum() < err(rtn).sum()


def test_embedding_format_is_validated():
    module = quantize_embedding_matrix(torch.randn(8, 64), QuantConfig(group_size=32, search=False))
    module.zp[0, 0] = 16
    with pytest.raises(FormatError, match="zero points exceed 15"):
        module.validate()
    module.zp[0, 0] = 0
    module.scale = module.scale[:, :1].contiguous()
    with pytest.raises(FormatError, match="scale is torch.float32"):
        module.validate()


CASES = [("llama", "dgq", BOTH), ("opt", "dgq", BOTH), ("opt", "dgq", HEAD), ("opt", "dgq", EMB),
         ("llama", "dgq_static", HEAD), ("qwen2", "dgq_gptaq", BOTH), ("llama", "dgq_rot", BOTH)]


@pytest.mark.parametrize("family,method,options", CASES)
def test_round_trip_is_bit_identical(family, method, options, tmp_path):
    model = quantized(family, method, options)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, QuantLinear) == ("quantize_head" in options)
    assert isinstance(embedding, QuantEmbedding) == ("quantize_embedding" in options)
    assert not model.config.tie_word_embeddings  # whichever was quantized, the two are apart now
    assert_loads_back_bit_identical(model, tmp_path, PROMPT)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    settings = config["quantization_config"]["settings"]
    assert all(settings[name] == (name in options) for name in ("quantize_head", "quantize_embedding"))


def test_tied_model_keeps_the_float_side_it_does_not_quantize():
    original = make_model("opt")
    assert original.get_output_embeddings().weight is original.get_input_embeddings().weight
    matrix = original.get_input_embeddings().weight.detach().clone()
    head_only = quantized("opt", "dgq", HEAD)
    assert torch.equal(head_only.get_input_embeddings().weight, matrix)  # the embedding is the original matrix
    embedding_only = quantized("opt", "dgq", EMB)
    assert torch.equal(embedding_only.get_output_embeddings().weight, matrix)  # so is the head
    assert "lm_head.weight" not in getattr(embedding_only, "all_tied_weights_keys", {})


def test_head_option_changes_only_the_head_and_the_final_norm():
    """The head is quantized after the blocks, from the last hidden states, so every other tensor is exactly
    what the run without the option gives (that run's state dict is main's: the options default to off)."""
    off, on = quantized("llama", "dgq", ()).state_dict(), quantized("llama", "dgq", HEAD).state_dict()
    changed = {k for k in off.keys() | on.keys() if k not in off or k not in on or not torch.equal(off[k], on[k])}
    assert "model.norm.weight" in changed and "lm_head.s1" in changed  # the smoothing scales, the new layer
    assert all(k.startswith(("lm_head.", "model.norm.")) for k in changed), sorted(changed)


def test_the_embedding_is_quantized_before_calibration():
    """With the embedding in 4 bits the blocks calibrate on its rows: the first block's statistics, hence its
    quantized weights, differ from the run without the option."""
    off, on = quantized("llama", "dgq", ()), quantized("llama", "dgq", EMB)
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(off.get_submodule(q).s1, on.get_submodule(q).s1)


def test_options_save_memory():
    """The bytes held by the head and the embedding (the point of the options) on a tied model: one shared float
    matrix before, two 4-bit ones after."""
    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    model = quantized("opt", "dgq", BOTH)
    before = make_model("opt").get_input_embeddings().weight
    after = nbytes(model.get_input_embeddings()) + nbytes(model.get_output_embeddings())
    assert after < 0.5 * before.numel() * before.element_size()


def test_compressed_tensors_refuses_and_fake_fp16_dequantizes(tmp_path):
    model = quantized("llama", "dgq", BOTH)
    with pytest.raises(ExportError, match="quantize_head/quantize_embedding"):
        export(model, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
    out = export(model, tmp_path / "fp16", "fake-fp16", tokenizer=make_tokenizer())
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(plain.get_input_embeddings().weight, model.get_input_embeddings().dequantize().half())
    assert torch.equal(plain.lm_head.weight, model.lm_head.dual_grained().dequantize(torch.float16))


def test_a_module_entry_of_the_wrong_kind_is_refused_in_one_line(tmp_path):
    save(quantized("llama", "dgq", BOTH), tmp_path / "ckpt", tokenizer=make_tokenizer())
    file = tmp_path / "ckpt" / "config.json"
    config = json.loads(file.read_text())
    modules = config["quantization_config"]["modules"]
    modules["lm_head"], modules["model.embed_tokens"] = modules["model.embed_tokens"], modules["lm_head"]
    file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="module (lm_head|model.embed_tokens) is a '(embedding|dgq)' module, "
                                              "but the model has a (Linear|Embedding) there"):
        load(tmp_path / "ckpt")


def test_a_4bit_embedding_without_dgq_is_refused_not_randomised(tmp_path):
    """A fresh interpreter that never imports dgq builds a float embedding: the codes, stored as ``weight``
    ([num, dim / 2] uint8), fail its size check (as the linears' codes do), so transformers refuses the checkpoint
    instead of filling the embedding with random values."""
    save(quantized("llama", "dgq", EMB), tmp_path / "ckpt", tokenizer=make_tokenizer())
    proc = load_without_dgq(tmp_path / "ckpt")
    assert proc.returncode != 0
    assert "model.embed_tokens.weight" in proc.stderr and "MISMATCH" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("RuntimeError: You set `ignore_mismatched_sizes`")


def test_the_options_need_a_weight_format():
    for option in ("quantize_head", "quantize_embedding"):
        with pytest.raises(ConfigError, match="need a weight format"):
            preset("fp", **{option: True})


def _opt_with_project_out() -> torch.nn.Module:
    """OPT-350m's layout: the head reads ``project_out``'s output, not the final norm's."""
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64)).eval()


@pytest.mark.parametrize("build,option,message", [
    (lambda: make_model("gemma3"), "quantize_embedding", "plain nn.Embedding; this model's input embedding is Gemma3"),
    (_opt_with_project_out, "quantize_head", "does not feed the LM head directly"),
])
def test_a_model_the_options_cannot_serve_is_refused_untouched(build, option, message):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=message):
        quantize(model, samples, preset("dgq", group_size=64, nsamples=2, seqlen=32, **{option: True}),
                 device="cpu", progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_cli_flags_and_help(model_dir, tmp_path, data_dir, capsys):
    common = ["--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--data-dir", str(data_dir)]
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "q"), "--quantize-head", "--quantize-embedding",
                 *common]) == 0
    loaded = load(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantLinear) and isinstance(loaded.get_input_embeddings(), QuantEmbedding)
    gemma = tmp_path / "gemma"
    make_model("gemma3").save_pretrained(gemma)
    make_tokenizer().save_pretrained(gemma)
    capsys.readouterr()
    assert main(["quantize", str(gemma), "--out", str(tmp_path / "g"), "--quantize-embedding", *common]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "plain nn.Embedding" in err[0] and not (tmp_path / "g").exists()
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--quantize-head", "--quantize-embedding"):
        assert flag in text
    assert "0.244 -> ~0.064 GiB" in text and "perplexity" in text


def test_e2e_gives_dgq_the_options_and_keeps_fp16_elsewhere():
    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import e2e

    model = e2e.convert(make_model("llama").half(), "dgq_dynamic", fuse=False, head=True, embedding=True)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.get_input_embeddings(), QuantEmbedding)
    assert model.get_input_embeddings().scale.dtype == torch.float16
    w8a8 = e2e.convert(make_model("llama").half(), "w8a8", head=True, embedding=True)
    assert type(w8a8.lm_head) is torch.nn.Linear and type(w8a8.get_input_embeddings()) is torch.nn.Embedding
