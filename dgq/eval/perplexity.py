"""Perplexity as GPTQ, SmoothQuant and DGQ report it: tokenize the whole test text once, cut it into
non-overlapping windows of ``seqlen`` tokens, and take exp of the mean next-token NLL over every window."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dgq.data import data_root, load_eval_text

C4_MAX_WINDOWS = 256  # GPTQ evaluates the first 256 windows of C4
_TOKEN_CACHE: dict[tuple[str, str, str], torch.Tensor] = {}


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    windows: int
    seqlen: int
    nll: float


def tokenize_eval(tokenizer, dataset: str, root: str | Path | None = None) -> torch.Tensor:  # noqa: ANN001
    """Token ids of the whole evaluation text, cached per tokenizer and data folder (tokenizing is slow)."""
    key = (getattr(tokenizer, "name_or_path", "") or str(id(tokenizer)), dataset, str(data_root(root)))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenizer(load_eval_text(dataset, root), return_tensors="pt").input_ids[0]
    return _TOKEN_CACHE[key]


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer, dataset: str, seqlen: int = 2048,  # noqa: ANN001
               windows: int | None = None, root: str | Path | None = None, device: torch.device | str | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``windows`` windows (default: all; C4 at most 256)."""
    ids = tokenize_eval(tokenizer, dataset, root)
    available = ids.numel() // seqlen
    if dataset == "c4":
        available = min(available, C4_MAX_WINDOWS)
    if available == 0:
        raise ValueError(f"{dataset} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if windows is not None and windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    n = available if windows is None else min(windows, available)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total = 0.0
    for i in tqdm(range(n), desc=f"ppl {dataset}", unit="window", disable=not progress):
        window = ids[i * seqlen:(i + 1) * seqlen].to(device)[None]
        logits = model(window, use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, window[0, 1:]))
    nll = total / n
    return PerplexityResult(dataset, math.exp(nll), n, seqlen, nll)
