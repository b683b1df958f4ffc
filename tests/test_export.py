"""Exports: compressed-tensors (decompressed by the real package) and fake-fp16 (loaded by plain transformers)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dgq.checkpoint import SINGLE_FILE, save
from dgq.export import ExportError, export, pack_int4
from dgq.hf import quant_config
from dgq.nn import FakeQuantLinear, QuantLinear
from helpers import make_tokenizer
from test_checkpoint import quantized

needs_ct = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                              reason="the compressed-tensors package is not installed (pip install dgq[dev])")
# float16 scales round once on export (2**-11) and once more when the reader dequantizes in float16.
FP16_REL = 2.0**-10


def _quantized_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, FakeQuantLinear))}


def _dequantized(module: torch.nn.Module) -> torch.Tensor:
    return module.dual_grained().dequantize() if isinstance(module, QuantLinear) else module.weight.float()


@needs_ct
def test_pack_int4_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    values = torch.randint(-8, 8, (20, 44), dtype=torch.int8)  # ragged in both directions
    for dim in (0, 1):
        assert torch.equal(pack_int4(values, dim), pack_to_int32(values, 4, packed_dim=dim))


@needs_ct
@pytest.mark.parametrize("family,method", [("llama", "w4a8_rtn_dg"), ("gemma3", "dgq_static")])
def test_compressed_tensors_decompresses_to_our_weights(family, method, tmp_path):
    from transformers import CompressedTensorsConfig

    model = quantized(family, method)
    out = export(model, tmp_path / "ct", "compressed-tensors", tokenizer=make_tokenizer())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    weights, acts = qc["config_groups"]["group_0"]["weights"], qc["config_groups"]["group_0"]["input_activations"]
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    assert (weights["strategy"], weights["group_size"], weights["symmetric"]) == ("group", 64, False)
    assert (acts["num_bits"], acts["dynamic"]) == (8, quant_config(model).act == "dynamic")
    state = load_file(out / SINGLE_FILE)
    layer = "model.layers.0.mlp.down_proj"
    assert {k.rsplit(".", 1)[1]: v.dtype for k, v in state.items() if k.startswith(layer + ".")} == {
        "weight_packed": torch.int32, "weight_scale": torch.float16, "weight_zero_point": torch.int32,
        "weight_shape": torch.int64, **({"input_scale": torch.float16} if method == "dgq_static" else {})}

    reloaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    worst = 0.0
    for name, module in _quantized_modules(model).items():
        ours = _dequantized(module)
        theirs = reloaded.get_submodule(name).weight.detach().float()
        worst = max(worst, float(((theirs - ours).abs() / ours.abs().clamp(min=1e-30)).max()))
    print(f"{family}: largest relative weight error after compressed-tensors decompression {worst:.2e}")
    assert worst <= FP16_REL


def test_compressed_tensors_refuses_non_dual_models(tmp_path):
    with pytest.raises(ExportError, match="needs dual-grained weights"):
        export(quantized("opt", "w4a8_rtn"), tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("family,method", [("llama", "w4a8_rtn_dg"), ("opt", "w4a8_rtn")])
def test_fake_fp16_loads_with_plain_transformers(family, method, tmp_path):
    model = quantized(family, method)
    save(model, tmp_path / "ckpt", tokenizer=make_tokenizer())
    out = export(tmp_path / "ckpt", tmp_path / "fp16", "fake-fp16")  # from a directory: tokenizer comes along
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.dtype == torch.float16 and "quantization_config" not in json.loads((out / "config.json").read_text())
    for name, module in _quantized_modules(model).items():
        assert type(plain.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(plain.get_submodule(name).weight, _dequantized(module).half())
    assert (plain.get_output_embeddings().weight is plain.get_input_embeddings().weight) == \
        model.config.tie_word_embeddings
    ids = AutoTokenizer.from_pretrained(out)("hello", return_tensors="pt").input_ids
    assert plain.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_export_refuses_existing_output_and_unknown_format(tmp_path):
    model = quantized("llama", "w4a8_rtn_dg")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export(model, tmp_path / "taken", "fake-fp16")
    with pytest.raises(ExportError, match="unknown export format 'gguf'"):
        export(model, tmp_path / "x", "gguf")
    export(model, tmp_path / "taken", "fake-fp16", overwrite=True)
    assert (tmp_path / "taken" / SINGLE_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_export(tmp_path, capsys):
    from dgq.cli import main

    save(quantized("opt", "w4a8_rtn"), tmp_path / "ckpt", tokenizer=make_tokenizer())
    assert main(["export", str(tmp_path / "ckpt"), "--format", "fake-fp16", "--out", str(tmp_path / "fp16")]) == 0
    assert (tmp_path / "fp16" / "tokenizer.json").is_file()
    assert main(["export", str(tmp_path / "ckpt"), "--format", "compressed-tensors", "--out",
                 str(tmp_path / "ct")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: compressed-tensors export needs dual-grained weights")
    assert not (tmp_path / "ct").exists()
