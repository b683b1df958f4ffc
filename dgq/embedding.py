"""The input embedding in 4 bits, and the untying of a head that shares the embedding's matrix.

Why: in a 7B model the fp16 embedding (32000 x 4096, 0.244 GiB) is as large as the LM head and both stay fp16 in
the other formats, which keeps the peak memory above the 0.55x-of-W8A8 target (issue 12).  The embedding never
enters a GEMM (its forward gathers rows), so it needs none of the dual-grained format's int8-safe structure: the
simplest exact format is enough.

Format (:class:`QuantEmbedding`), per row ``r`` of the ``[num_embeddings, dim]`` matrix and group ``j`` of
``group_size`` consecutive columns:

* ``weight`` uint8 ``[num_embeddings, dim / 2]``: 4-bit codes ``u`` in ``[0, 15]``, column ``2c`` in the low
  nibble of byte ``c`` and column ``2c + 1`` in the high one (row-major, so a token's row is one contiguous
  gather).  Named ``weight`` for the reason :mod:`dgq.hf` gives for ``QuantLinear``'s stored codes: a transformers
  without dgq builds a float ``nn.Embedding`` there and refuses the checkpoint for the shape mismatch, instead of
  filling a missing ``weight`` with random values;
* ``zp`` uint8 ``[num_embeddings, dim / g]``: integer zero point in ``[0, 15]``;
* ``scale`` ``[num_embeddings, dim / g]`` in the model's float dtype (it is cast with the model, as a float
  embedding's weight would be, and the output takes its dtype);

and the embedding row is ``e[r, c] = (u[r, c] - zp[r, j]) * scale[r, j]``, computed in float32 and rounded once to
the scale's dtype.  One formula, no device-specific path: the CPU forward is the reference, and every device runs
the same operations (an integer difference times one float, a correctly rounded IEEE product), so it gives the
same bits everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from dgq.config import ConfigError, QuantConfig
from dgq.formats import INT4_MAX, FormatError, relative_error
from dgq.search import rtn_group_scales, search_group_clip


class QuantEmbedding(nn.Module):
    """A 4-bit input embedding with a float scale and an integer zero point per (row, group) (module docstring).

    ``num_embeddings`` and ``embedding_dim`` are kept as attributes because callers read them from
    ``model.get_input_embeddings()`` (e.g. the vocabulary size that token ids must fit).
    """

    STORED = ("weight", "zp", "scale")  # the buffers, saved under their own names and in their own layout

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if embedding_dim % 2 or group_size < 2 or embedding_dim % group_size:
            raise ValueError(f"a 4-bit embedding needs an even width divisible by the group size; got width "
                             f"{embedding_dim}, group size {group_size}")
        if not dtype.is_floating_point:
            raise ValueError(f"the embedding's output dtype must be a float dtype, got {dtype}")
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        groups = embedding_dim // group_size
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("zp", torch.zeros(num_embeddings, groups, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, groups, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, u4: torch.Tensor, zp: torch.Tensor, scale: torch.Tensor) -> "QuantEmbedding":
        """The module holding codes ``u4`` uint8 ``[num, dim]``, zero points and scales ``[num, dim / g]``."""
        num, dim = u4.shape
        module = cls(num, dim, dim // zp.shape[1], scale.dtype, u4.device)
        module.weight.copy_(pack_rows(u4))
        module.zp.copy_(zp)
        module.scale.copy_(scale)
        module.validate()
        return module

    def validate(self, name: str = "embedding") -> None:
        """Raise :class:`~dgq.formats.FormatError` naming ``name`` if a tensor breaks the format."""
        groups = self.embedding_dim // self.group_size
        expect = {"weight": ((self.num_embeddings, self.embedding_dim // 2), (torch.uint8,)),
                  "zp": ((self.num_embeddings, groups), (torch.uint8,)),
                  "scale": ((self.num_embeddings, groups), (torch.float32, torch.float16, torch.bfloat16))}
        for field, (shape, dtypes) in expect.items():
            t = getattr(self, field)
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                raise FormatError(f"{name}: {field} is {t.dtype}{list(t.shape)}, expected {dtypes[0]}{list(shape)}")
        if self.zp.numel() and int(self.zp.max()) > INT4_MAX:
            raise FormatError(f"{name}: zero points exceed {INT4_MAX}")
        if not torch.isfinite(self.scale).all():
            raise FormatError(f"{name}: scales contain NaN or Inf")

    def codes_unpacked(self) -> torch.Tensor:
        """The 4-bit codes as uint8 ``[num_embeddings, dim]``."""
        return unpack_rows(self.weight)

    def dequantize(self) -> torch.Tensor:
        """The float ``[num_embeddings, dim]`` matrix this module represents, in the scale's dtype."""
        return self._rows(self.weight, self.zp, self.scale)

    def _rows(self, codes: torch.Tensor, zp: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        u = unpack_rows(codes).reshape(*codes.shape[:-1], -1, self.group_size)
        rows = (u.float() - zp.float()[..., None]) * scale.float()[..., None]
        return rows.reshape(*codes.shape[:-1], self.embedding_dim).to(scale.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Gather the rows of ``input_ids`` (any shape) and dequantize only them: ``[*input_ids.shape, dim]``."""
        return self._rows(self.weight[input_ids], self.zp[input_ids], self.scale[input_ids])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}, bits=4"


def pack_rows(u4: torch.Tensor) -> torch.Tensor:
    """Pack codes ``[..., 2n]`` (values 0..15) into bytes ``[..., n]``: even columns low nibble, odd ones high."""
    return (u4[..., 0::2] | (u4[..., 1::2] << 4)).contiguous()


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_rows`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


@torch.no_grad()
def quantize_embedding_matrix(weight: torch.Tensor, config: QuantConfig) -> QuantEmbedding:
    """The 4-bit embedding of ``weight`` ``[num, dim]`` with ``config.group_size``-column groups.

    With ``config.search`` each group's clipping ratio is chosen from the same grid as the linears' phase 1
    (``clip_grid`` ratios in ``[clip_min, 1]``), scored by the group's squared rounding error: every row is read
    alone, so no activation statistics weigh its columns (``H = I``).  Without it: min/max rounding.  The scale is
    rounded to ``weight``'s dtype *before* the codes are chosen, so the codes are the nearest ones for the scale
    that is stored.
    """
    w = weight.detach().float()
    g = config.group_size
    if config.search:
        eye = torch.eye(w.shape[1], device=w.device)
        gs = search_group_clip(w, eye, g, config.clip_grid, config.clip_min)
    else:
        gs = rtn_group_scales(w, g)
    tiny = torch.finfo(weight.dtype).tiny
    scale = gs.scale.clamp(min=tiny).to(weight.dtype)
    s = scale.float()
    zp = torch.round(-gs.lo / s).clamp(0, INT4_MAX)
    wg = w.reshape(w.shape[0], -1, g)
    u4 = torch.clamp(torch.round(wg / s[..., None]) + zp[..., None], 0, INT4_MAX).reshape(w.shape)
    return QuantEmbedding.from_codes(u4.to(torch.uint8), zp.to(torch.uint8), scale)


def untie_head(model: nn.Module) -> bool:
    """Give the LM head its own copy of a matrix it shares with the input embedding; returns whether it did.

    Either option changes one of the two and must leave the other as it was.  The model's config then says the
    two are apart (``tie_word_embeddings = False``), and transformers' precomputed map of tied parameters is
    emptied of the pair, so that saving writes both and loading does not tie them again.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None or getattr(head, "weight", None) is not weight:  # (a quantized head has no float weight)
        return False
    head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        head_name = next(n for n, p in model.named_parameters() if p is head.weight)
        for key in [k for k, v in tied.items() if head_name in (k, v)]:
            tied.pop(key)
    return True


def check_embedding(model: nn.Module, config: QuantConfig) -> None:
    """Refuse, before any work, an input embedding that :func:`quantize_input_embedding` cannot replace (works on a
    meta-device skeleton: only types and shapes are read)."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding:  # e.g. Gemma's scaled embedding multiplies its rows in forward
        raise ConfigError(f"quantize_embedding replaces a plain nn.Embedding; this model's input embedding is "
                          f"{type(embedding).__name__}")
    dim = embedding.embedding_dim
    if dim % 2 or dim % config.group_size:
        raise ConfigError(f"quantize_embedding: group size {config.group_size} does not divide the embedding "
                          f"width {dim} (or the width is odd)")


@torch.no_grad()
def quantize_input_embedding(model: nn.Module, config: QuantConfig, device: torch.device | str | None = None,
                             ) -> float:
    """Replace ``model``'s input embedding by its :class:`QuantEmbedding`, in place, computed on ``device``
    (default: where the embedding is) and kept where the embedding was; a head that shared its matrix keeps the
    float matrix (:func:`untie_head`).  Returns the relative squared error of the matrix."""
    check_embedding(model, config)
    untie_head(model)
    weight = model.get_input_embeddings().weight
    module = quantize_embedding_matrix(weight.to(device or weight.device), config)
    error = relative_error(weight.to(module.scale.device), module.dequantize())
    model.set_input_embeddings(module.to(weight.device))
    return error
