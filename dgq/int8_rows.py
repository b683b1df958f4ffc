"""The LM head and the input embedding as int8 rows: one int8 code per weight, one float scale per row.

Why: in a 7B model the fp16 head and embedding (32000 x 4096 each, 0.244 GiB) are 14% of DGQ's weights, the head is
read whole by every decode step (99 us of a 2.56 ms Llama-2-7B step on an H100), and together they keep the peak
memory above issue 12's 0.55x of W8A8's.  The 4-bit options (``quantize_head``, ``quantize_embedding``) save more but
cost perplexity (RESULTS.md, "A 4-bit LM head and embedding"); a symmetric int8 code per weight with a per-row scale
keeps each row to within half a step of 1/127 of its largest magnitude, which is near-lossless, and halves the bytes.

Format, per row ``r`` of a ``[rows, cols]`` matrix (a head's output channel, an embedding's token):
``w[r, c] = q[r, c] * s[r]`` with ``q`` int8 in ``[-127, 127]`` and ``s = max|w[r]| / 127`` in the model's float
dtype, computed in float32 and rounded once to that dtype.  Weight-only: the head's input stays in the model's
dtype.  One format for both, so that both modules share the rounding, the checkpoint layout and the checks.

Checkpoint layout: the codes are stored transposed, as ``weight`` int8 ``[cols, rows]``.  Under the name ``weight``
a transformers that does not know dgq builds its float module there and refuses the checkpoint for the shape
mismatch, instead of loading int8 codes as float weights (same shape) or a random matrix (another name); in memory
the codes are ``[rows, cols]``, each row contiguous for the kernel's and the gather's reads.
"""

from __future__ import annotations

from typing import Callable, Self

import torch
from torch import nn

from dgq.config import ConfigError
from dgq.embedding import untie_head
from dgq.formats import INT8_MAX, FormatError, relative_error

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 ``[rows, cols]`` and scales ``[rows]`` in ``weight``'s dtype (module docstring).  The scale is
    rounded to that dtype before the codes are chosen, so they are the nearest codes for the scale that is stored;
    a zero row gets the smallest normal scale and zero codes."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / INT8_MAX).clamp(min=torch.finfo(weight.dtype).tiny).to(weight.dtype)
    codes = torch.round(w / scale.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


class Int8Rows(nn.Module):
    """The buffers of the int8-rows format and what every holder of them does: validate, dequantize, save, load.

    ``codes`` int8 ``[rows, cols]`` and ``scale`` ``[rows]`` in the model's float dtype (cast with the model, as a
    float weight would be, and the output takes its dtype)."""

    STORED = {"codes": "weight"}  # buffer -> its checkpoint name (``scale``: same), as dgq.nn.QuantLinear.STORED

    def __init__(self, rows: int, cols: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"int8 rows need a float scale dtype, got {dtype}")
        self.rows, self.cols = rows, cols
        self.register_buffer("codes", torch.zeros(rows, cols, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(rows, dtype=dtype, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> Self:
        """The module holding the float matrix ``weight`` ``[rows, cols]`` as int8 rows, where ``weight`` is."""
        module = cls(*weight.shape, weight.dtype, weight.device)
        module.codes, module.scale = quantize_rows_int8(weight)
        return module

    def validate(self, name: str) -> None:
        """Raise :class:`~dgq.formats.FormatError` naming ``name`` if a buffer breaks the format."""
        if self.codes.dtype != torch.int8 or tuple(self.codes.shape) != (self.rows, self.cols):
            raise FormatError(f"{name}: codes are {self.codes.dtype}{list(self.codes.shape)}, expected "
                              f"torch.int8{[self.rows, self.cols]}")
        if self.scale.dtype not in FLOAT_DTYPES or tuple(self.scale.shape) != (self.rows,):
            raise FormatError(f"{name}: scale is {self.scale.dtype}{list(self.scale.shape)}, expected a float "
                              f"[{self.rows}]")
        if self.codes.numel() and int(self.codes.min()) < -INT8_MAX:
            raise FormatError(f"{name}: a code is -128, outside the symmetric range [-127, 127]")
        if not torch.isfinite(self.scale).all():
            raise FormatError(f"{name}: scales contain NaN or Inf")

    def dequantize(self) -> torch.Tensor:
        """The float ``[rows, cols]`` matrix this module represents, in the scale's dtype."""
        return (self.codes.float() * self.scale.float()[:, None]).to(self.scale.dtype)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The codes in the checkpoint's layout (module docstring), under their stored name."""
        return {"weight": self.codes.t().contiguous()}

    def load_stored(self, weight: torch.Tensor) -> None:
        """Take the checkpoint's codes (:meth:`stored_tensors`' layout) as this module's buffer."""
        self.register_buffer("codes", weight.t().contiguous())

    def skeleton_buffers(self) -> None:
        """Hold the stored layout instead of the codes (on the meta device, for a checkpoint to load into)."""
        stored = self.stored_tensors()
        del self._buffers["codes"]
        for name, tensor in stored.items():
            self.register_buffer(name, tensor)


class Int8Linear(Int8Rows):
    """A bias-free linear layer (the LM head) with int8-rows weights: ``y = x @ (q * s)ᵀ``; built as
    ``Int8Linear(out_features, in_features)``, rows first like its weight.

    On CUDA, fp16/bf16: dgq's kernel reads the int8 codes (:mod:`dgq.kernels.int8_rows`; fp32 accumulation).
    Elsewhere: the same product in float32 on the dequantized codes (the reference), rounded to ``x``'s dtype, the
    codes widened :data:`REFERENCE_CHUNK_ROWS` rows at a time.  Why chunks: widened whole, SmolLM2-135M's head
    (49152 x 576) took 55-68 ms per decoded token on 2 CPU cores against 6.6 ms for its fp32 ``nn.Linear``; in
    chunks that stay in cache, 2.5-8.2 ms.  Each output is the same dot product over K; BLAS may sum it in another
    order for another chunk width (float32 rounding: ``tests/test_int8_rows.py``)."""

    REFERENCE_CHUNK_ROWS = 4096

    in_features = property(lambda self: self.cols)
    out_features = property(lambda self: self.rows)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Self:
        if linear.bias is not None:
            raise ValueError("the int8 head takes a bias-free linear layer")
        return cls.from_weight(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16):
            from dgq.kernels.ops import int8_rows_linear

            out = int8_rows_linear(x2.contiguous(), self.codes, self.scale)
        else:
            xf, rows = x2.float(), self.REFERENCE_CHUNK_ROWS
            out = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32, device=x.device)
            for start in range(0, self.out_features, rows):
                torch.mm(xf, self.codes[start:start + rows].float().t(), out=out[:, start:start + rows])
            out = (out * self.scale.float()).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class Int8Embedding(Int8Rows):
    """An input embedding with int8-rows weights: the gathered rows ``q[ids] * s[ids]``, computed in float32 and
    rounded once to the scale's dtype.  ``num_embeddings`` and ``embedding_dim`` are there because callers read them
    from ``model.get_input_embeddings()``."""

    num_embeddings = property(lambda self: self.rows)
    embedding_dim = property(lambda self: self.cols)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (self.codes[input_ids].float() * self.scale[input_ids].float()[..., None]).to(self.scale.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8"


def check_int8_options(model: nn.Module, head: bool, embedding: bool) -> None:
    """Refuse, before any work, a head or embedding the int8 options cannot replace (works on a meta-device
    skeleton: only types are read)."""
    if head:
        linear = model.get_output_embeddings()
        if type(linear) is not nn.Linear or linear.bias is not None:
            bias = " with a bias" if getattr(linear, "bias", None) is not None else ""
            raise ConfigError(f"int8_head replaces a bias-free nn.Linear LM head; this model's is "
                              f"{type(linear).__name__}{bias}")
    if embedding and type(model.get_input_embeddings()) is not nn.Embedding:  # e.g. Gemma's scaled embedding
        raise ConfigError(f"int8_embedding replaces a plain nn.Embedding; this model's input embedding is "
                          f"{type(model.get_input_embeddings()).__name__}")


@torch.no_grad()
def int8_head(model: nn.Module) -> tuple[str, float]:
    """Replace ``model``'s LM head by its :class:`Int8Linear`, in place (a head tied to the embedding first gets
    its own copy: :func:`dgq.embedding.untie_head`).  Returns the head's name and relative squared error."""
    check_int8_options(model, head=True, embedding=False)
    untie_head(model)
    linear = model.get_output_embeddings()
    return _replaced(model, linear.weight, Int8Linear.from_linear(linear), model.set_output_embeddings)


@torch.no_grad()
def int8_input_embedding(model: nn.Module) -> tuple[str, float]:
    """Replace ``model``'s input embedding by its :class:`Int8Embedding`, in place; a head that shared its matrix
    keeps the float one.  Returns the embedding's name and relative squared error."""
    check_int8_options(model, head=False, embedding=True)
    untie_head(model)
    weight = model.get_input_embeddings().weight
    return _replaced(model, weight, Int8Embedding.from_weight(weight), model.set_input_embeddings)


def _replaced(model: nn.Module, weight: torch.Tensor, module: Int8Rows,
              install: Callable[[nn.Module], None]) -> tuple[str, float]:
    """``module`` installed in ``model`` in place of the float ``weight``'s module; its name and relative error."""
    install(module)
    name = next(n for n, m in model.named_modules() if m is module)
    return name, relative_error(weight, module.dequantize())
