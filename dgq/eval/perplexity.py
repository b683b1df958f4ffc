"""Perplexity as GPTQ, SmoothQuant and DGQ report it: tokenize the whole test text once, cut it into
non-overlapping windows of ``seqlen`` tokens, and take exp of the mean next-token NLL over the windows."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dgq.config import ConfigError
from dgq.data import DataError, data_root, load_eval_text, token_ids

C4_MAX_WINDOWS = 256  # GPTQ evaluates the first 256 windows of C4
_TOKEN_CACHE: dict[tuple[str, str, str], torch.Tensor] = {}


@dataclass(frozen=True)
class PerplexityResult:
    """One evaluation; ``nll`` is the mean next-token negative log-likelihood (nats), ``ppl = exp(nll)``.

    ``note`` is empty unless fewer windows than asked for were available and the request was clamped.
    """

    dataset: str
    ppl: float
    windows: int
    seqlen: int
    nll: float
    note: str = ""


def _tokenizer_key(tokenizer) -> str:  # noqa: ANN001
    """A fingerprint of what the tokenizer does, not of its name: two GGUF files in one folder share a
    ``name_or_path`` but may tokenize differently, and tokenizers built in memory have no name at all."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return hashlib.sha1(backend.to_str().encode()).hexdigest()
    return f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"


def tokenize_eval(tokenizer, dataset: str, root: str | Path | None = None) -> torch.Tensor:  # noqa: ANN001
    """Token ids of the whole evaluation text, cached in memory per tokenizer, dataset and data folder, because
    tokenizing WikiText-2 or C4 takes seconds and a benchmark evaluates many models with one tokenizer."""
    key = (_tokenizer_key(tokenizer), dataset, str(data_root(root)))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = token_ids(tokenizer, load_eval_text(dataset, root))
    return _TOKEN_CACHE[key]


def _window_count(ids: torch.Tensor, dataset: str, seqlen: int, windows: int | None) -> tuple[int, str]:
    """How many windows to evaluate, and a note when the request had to be clamped to what exists."""
    if windows is not None and windows < 1:
        raise ConfigError(f"windows must be at least 1, got {windows}")
    available = ids.numel() // seqlen
    if dataset == "c4":
        available = min(available, C4_MAX_WINDOWS)
    if available == 0:
        raise DataError(f"{dataset} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if windows is None or windows <= available:
        return windows or available, ""
    return available, f"asked for {windows} windows of {dataset}, only {available} available; evaluated {available}"


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer, dataset: str, seqlen: int = 2048,  # noqa: ANN001
               windows: int | None = None, root: str | Path | None = None, device: torch.device | str | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``windows`` windows of ``dataset`` (default all; C4 at most 256).

    Each window is scored on its own (no context carried over), and the NLL is the mean over windows of each
    window's mean token loss, exactly GPTQ's ``exp(sum(loss * seqlen) / (windows * seqlen))``.
    """
    ids = tokenize_eval(tokenizer, dataset, root)
    n, note = _window_count(ids, dataset, seqlen, windows)
    if note and progress:
        tqdm.write(f"note: {note}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total = 0.0
    for i in tqdm(range(n), desc=f"ppl {dataset}", unit="window", disable=not progress):
        window = ids[i * seqlen:(i + 1) * seqlen].to(device)[None]
        logits = model(window, use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, window[0, 1:]))
    nll = total / n
    return PerplexityResult(dataset, math.exp(nll), n, seqlen, nll, note)
