"""Model specs resolve to the right source, with clear errors for what cannot be loaded."""

import pytest

from dgq.loading import ModelLoadError, load_model, resolve_model
from helpers import make_model


def test_alias_resolves_to_the_packaged_gguf():
    pytest.importorskip("gguf")
    try:
        source = resolve_model("smollm2-135m")
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    assert source.kind == "alias" and source.gguf_file.endswith(".gguf")


def test_local_directory_loads(tmp_path, tokenizer):
    make_model("qwen2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _, source = load_model(str(tmp_path))
    assert source.kind == "local" and model.config.model_type == "qwen2" and not model.training


@pytest.mark.parametrize("spec,message", [
    ("./missing-model", "does not exist"), ("/no/such/file.gguf", "does not exist"),
])
def test_bad_paths(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(spec)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path))
