"""Text generation from a (quantized) model, streamed piece by piece as the CLI prints it.

Generation is plain ``model.generate``: a loaded dgq checkpoint is an ordinary ``transformers`` model whose Linear
layers happen to be :class:`~dgq.nn.QuantLinear`, so greedy decoding, sampling and the KV cache all just work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import nn

from dgq.config import ConfigError


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy when ``temperature`` is 0, else sampling with ``temperature`` and nucleus ``top_p``.

    ``seed`` makes sampling reproducible (it seeds torch's global generators just before generating).
    ``compile``: a static KV cache and the compiled decode step (default: on CUDA; the first call compiles, which
    takes tens of seconds, and later calls of the same shapes replay).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    compile: bool | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def compiles(self, device: torch.device) -> bool:
        """Whether decoding on ``device`` uses the static cache and the compiled step."""
        return self.compile if self.compile is not None else device.type == "cuda"

    def generate_kwargs(self, device: torch.device) -> dict[str, Any]:
        cache = {"cache_implementation": "static"} if self.compiles(device) else {}
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, **cache}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": 0, **cache}


def _inputs(model: nn.Module, tokenizer: Any, prompt: str) -> dict[str, torch.Tensor]:
    if not prompt:
        raise ConfigError("the prompt is empty")
    enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _pad_id(tokenizer: Any) -> int | None:
    """Models without a pad token pad with end-of-sequence, which silences transformers' warning about it."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate_ids(model: nn.Module, tokenizer: Any, prompt: str,
                 settings: GenerationSettings = GenerationSettings()) -> torch.Tensor:
    """The new token ids (1-D) for ``prompt``, without streaming."""
    inputs = _inputs(model, tokenizer, prompt)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    with torch.no_grad():
        out = model.generate(**inputs, **settings.generate_kwargs(model.device), pad_token_id=_pad_id(tokenizer))
    return out[0, inputs["input_ids"].shape[1]:]


def generate(model: nn.Module, tokenizer: Any, prompt: str, settings: GenerationSettings = GenerationSettings(),
             out: TextIO | None = None) -> str:
    """The generated text for ``prompt``; with ``out``, each piece is also written (and flushed) as it arrives.

    Decoding runs in the caller's thread, the streamer writing each piece from its callback: on CUDA the compiled
    static-cache step replays through inductor's CUDA-graph trees, which keep their state per thread and failed in a
    worker thread (``torch._C._is_key_in_tls`` assertion; pytorch/pytorch#123177, seen on the H100 with torch 2.11).
    """
    from transformers import TextStreamer

    pieces: list[str] = []

    class PieceStreamer(TextStreamer):
        """transformers' streamer, each finished piece of text kept and written to ``out``."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                pieces.append(text)
                if out is not None:
                    out.write(text)
                    out.flush()

    inputs = _inputs(model, tokenizer, prompt)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    with torch.no_grad():
        model.generate(**inputs, **settings.generate_kwargs(model.device), pad_token_id=_pad_id(tokenizer),
                       streamer=PieceStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    return "".join(pieces)
