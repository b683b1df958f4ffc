"""Checkpoints: exact round trips through dgq.load and transformers' from_pretrained / save_pretrained,
byte-identical re-saves, sharding, atomic writes, one-line load errors, and what happens without ``import dgq``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dgq.api import quantize
from dgq.checkpoint import SINGLE_FILE, CheckpointError, load, save
from dgq.config import preset
from dgq.formats import DualGrainedWeight
from dgq.hf import DGQConfig, mark_quantized, quant_config
from dgq.models import adapter_for
from dgq.nn import FakeQuantLinear, QuantLinear
from helpers import VOCAB, load_without_dgq, make_model, make_tokenizer

CASES = [("llama", "w4a8_rtn_dg"), ("opt", "w4a8_rtn"), ("gemma3", "dgq_static"), ("qwen2", "w8a8_smoothquant")]
PROMPT = torch.arange(3, 3 + 2 * 12).reshape(2, 12) % VOCAB


@lru_cache(maxsize=None)
def quantized(family: str, method: str) -> torch.nn.Module:
    """A tiny quantized model, built once per test session (tests must not modify it)."""
    model = make_model(family)
    samples = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    config = preset(method, group_size=64, nsamples=4, seqlen=32, clip_grid=4, s1_grid=4)
    quantize(model, samples, config, device="cpu", progress=False)
    return model


@lru_cache(maxsize=None)
def saved(family: str, method: str, root: Path) -> Path:
    out = root / f"{family}-{method}"
    save(quantized(family, method), out, tokenizer=make_tokenizer(), card={"perplexity": {"wikitext2": 12.5}})
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.mark.parametrize("family,method", CASES)
def test_round_trip_is_exact_and_resave_byte_identical(family, method, root, tmp_path):
    model = quantized(family, method)
    path = saved(family, method, root)
    loaded = load(path)
    assert torch.equal(logits(loaded), logits(model))
    assert isinstance(loaded.config.quantization_config, DGQConfig)
    assert quant_config(loaded) == quant_config(model)
    kinds = {n: type(m) for n, m in loaded.named_modules() if isinstance(m, (QuantLinear, FakeQuantLinear))}
    assert kinds == {n: type(m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, FakeQuantLinear))}
    assert kinds and set(kinds.values()) == {QuantLinear if quant_config(model).weight == "dual" else FakeQuantLinear}
    tied = model.config.tie_word_embeddings
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    # the loaded layers hold the same buffers as freshly quantized ones, so moves and casts reach every tensor
    assert {n: sorted(m._buffers) for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == \
        {n: sorted(m._buffers) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    save(loaded, tmp_path / "again", tokenizer=make_tokenizer(), card={"perplexity": {"wikitext2": 12.5}})
    for name in (SINGLE_FILE, "config.json", "README.md"):
        assert (tmp_path / "again" / name).read_bytes() == (path / name).read_bytes(), name


@pytest.mark.parametrize("family,method", CASES[:3])
def test_from_pretrained_and_save_pretrained_are_dgq_load_and_save(family, method, root, tmp_path):
    path = saved(family, method, root)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(logits(hf), logits(load(path)))
    assert quant_config(hf) == quant_config(quantized(family, method))
    assert {n: type(m) for n, m in hf.named_modules()} == {n: type(m) for n, m in load(path).named_modules()}
    hf.save_pretrained(tmp_path / "hf")
    for name in (SINGLE_FILE, "config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (path / name).read_bytes(), name
    assert torch.equal(logits(load(tmp_path / "hf")), logits(quantized(family, method)))


def test_without_import_dgq_transformers_refuses_dual_grained_checkpoints(root):
    """A fresh interpreter that never imports dgq: transformers skips the unknown quant_method and builds float
    Linear layers, and the packed codes stored as ``P.weight`` ([in/2, out] uint8) fail its size check."""
    proc = load_without_dgq(saved("llama", "w4a8_rtn_dg", root))
    assert proc.returncode != 0
    assert "Unknown quantization type, got dgq" in proc.stderr
    assert "self_attn.q_proj.weight" in proc.stderr and "MISMATCH" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("RuntimeError: You set `ignore_mismatched_sizes` to `False`")


def test_config_records_settings_and_modules(root):
    path = saved("gemma3", "dgq_static", root)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "dgq" and qc["format_version"] == 2 and qc["smoothing_folded"] is True
    assert qc["settings"]["method"] == "dgq_static" and (qc["weight_bits"], qc["act_bits"]) == (4, 8)
    assert qc["modules"]["model.layers.1.mlp.down_proj"] == {"type": "dgq", "act": "static"}
    stored = load_file(path / SINGLE_FILE)
    assert "lm_head.weight" not in stored  # tied to the embeddings: stored once
    codes = stored["model.layers.1.mlp.down_proj.weight"]  # packed codes under the Linear's own name
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (256 // 2, 128)
    assert len(qc["modules"]) == 2 * len(adapter_for(quantized("gemma3", "dgq_static")).linear_names())
    assert "12.500" in (path / "README.md").read_text()
    assert (path / "tokenizer.json").is_file()


def test_forced_sharding_round_trips(tmp_path):
    model = quantized("llama", "w4a8_rtn_dg")
    save(model, tmp_path / "sharded", shard_bytes=64 * 1024)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "sharded" / SINGLE_FILE).exists()
    assert torch.equal(logits(load(tmp_path / "sharded")), logits(model))


def test_load_dtype_casts_only_unformatted_floats(root):
    loaded = load(saved("llama", "w4a8_rtn_dg", root), dtype=torch.bfloat16)
    layer = loaded.model.layers[0].mlp.up_proj
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 and layer.s1.dtype == torch.float32
    assert logits(loaded).dtype == torch.bfloat16


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_tensors(path: Path, edit) -> None:  # noqa: ANN001 - a function of the state dict
    state = load_file(path / SINGLE_FILE)
    edit(state)
    save_file(state, path / SINGLE_FILE)


def _edit_config(path: Path, edit) -> None:  # noqa: ANN001 - a function of the config dict
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


LAYER = "model.layers.0.self_attn.q_proj"
CORRUPTIONS = {
    "no config.json": (lambda p: (p / "config.json").unlink(), "no config.json"),
    "no quantization_config": (lambda p: _edit_config(p, lambda c: c.pop("quantization_config")),
                               "no dgq quantization_config"),
    "unknown version": (lambda p: _edit_config(p, lambda c: c["quantization_config"].update(format_version=99)),
                        "format_version 99"),
    "unknown module type": (lambda p: _edit_config(p, lambda c: c["quantization_config"]["modules"][LAYER].update(
        type="int3")), f"module {LAYER}: {{'act': 'dynamic', 'type': 'int3'}} is not"),
    "unknown config key": (lambda p: _edit_config(p, lambda c: c["quantization_config"].update(rotation=True)),
                           "unknown quantization_config keys: rotation"),
    "missing tensor": (lambda p: _edit_tensors(p, lambda s: s.pop(f"{LAYER}.s1")), f"missing tensor {LAYER}.s1"),
    "unexpected tensor": (lambda p: _edit_tensors(p, lambda s: s.update(extra=torch.zeros(1))),
                          "unexpected tensor extra"),
    "wrong shape": (lambda p: _edit_tensors(p, lambda s: s.update({f"{LAYER}.s1": torch.ones(3)})),
                    f"tensor {LAYER}.s1 is F32[3], expected F32[128]"),
    "wrong dtype": (lambda p: _edit_tensors(p, lambda s: s.update({f"{LAYER}.s2": s[f"{LAYER}.s2"].short()})),
                    f"tensor {LAYER}.s2 is I16[128, 2], expected I8[128, 2]"),
    "int8 overflow": (lambda p: _edit_tensors(p, lambda s: s.update({f"{LAYER}.s2": torch.full_like(
        s[f"{LAYER}.s2"], 127)})), "leaves [-127, 127]"),
    "truncated file": (lambda p: (p / SINGLE_FILE).write_bytes((p / SINGLE_FILE).read_bytes()[:-100]),
                       "corrupt or truncated"),
    "garbage file": (lambda p: (p / SINGLE_FILE).write_bytes(b"\x00" * 64), "corrupt or truncated"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_gives_one_line_error(case, root, tmp_path):
    corrupt, message = CORRUPTIONS[case]
    path = _copy(saved("llama", "w4a8_rtn_dg", root), tmp_path / "bad")
    corrupt(path)
    with pytest.raises(CheckpointError) as err:
        load(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_existing_output_refused_unless_overwrite(tmp_path):
    model = quantized("llama", "w4a8_rtn_dg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        save(model, out)
    assert (out / "stale.txt").is_file()
    save(model, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / SINGLE_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("existing", [False, True])
def test_failure_leaves_no_partial_output(existing, tmp_path, monkeypatch):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("old")

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise OSError("disk full")

    monkeypatch.setattr("dgq.checkpoint._model_card", broken)
    with pytest.raises(CheckpointError, match=f"^cannot write the output directory {out}: disk full$"):
        save(quantized("llama", "w4a8_rtn_dg"), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    assert not existing or [p.name for p in out.iterdir()] == ["keep.txt"]


def _peak_rss_during(fn) -> tuple[object, int]:  # noqa: ANN001
    """``fn()`` and the growth of peak resident memory while it ran (torch allocations bypass tracemalloc)."""
    def status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    before = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    result = fn()
    return result, status("VmHWM:") - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_loading_never_materialises_the_float_model(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(config).eval()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for block in model.model.layers:  # random valid dual-grained layers: this test is about memory, not accuracy
        for name in adapter_for(model).linear_names():
            lin = block.get_submodule(name)
            out, inp = lin.weight.shape
            dg = DualGrainedWeight(u4=torch.randint(0, 16, (out, inp), dtype=torch.uint8),
                                   zp=torch.full((out, inp // 128), 8, dtype=torch.uint8),
                                   s2=torch.ones(out, inp // 128, dtype=torch.int8), s1=torch.rand(out) + 0.1,
                                   group_size=128)
            block.set_submodule(name, QuantLinear.from_weight(dg, None, "dynamic"))
    mark_quantized(model, preset("w4a8_rtn_dg", group_size=128))
    save(model, tmp_path / "big")
    packed_bytes = (tmp_path / "big" / SINGLE_FILE).stat().st_size
    del model
    loaded, peak = _peak_rss_during(lambda: load(tmp_path / "big"))
    print(f"float model {float_bytes / 2**20:.1f} MiB, checkpoint {packed_bytes / 2**20:.1f} MiB, "
          f"peak RSS growth while loading {peak / 2**20:.1f} MiB")
    assert packed_bytes < float_bytes / 5
    assert peak < packed_bytes + float_bytes / 4  # a materialised float model would add float_bytes
    assert isinstance(loaded.model.layers[7].mlp.down_proj, QuantLinear)
