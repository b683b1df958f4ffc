"""Offline rotation of the residual stream (QuaRot-style), for Llama-family models.

An orthogonal ``Q`` applied to the residual stream (``h -> h Q``) spreads a few outlier channels over all
channels, which makes activations and weights easier to quantize, while the float model computes the same
function: every linear that reads the stream absorbs ``Q`` on its input side (``W -> W Q``), every linear that
writes into it on its output side (``W -> Qᵀ W``), the embeddings are rotated (``E -> E Q``), and RMSNorm
commutes with ``Q`` once its weight is 1 (``rms(h Q) = rms(h)``), so each norm's weight is first folded into
the linears it feeds.  ``Q`` is a randomised Hadamard matrix (random signs times a Sylvester Hadamard matrix); for
widths that are not a power of two (SmolLM2's 576 = 64 · 9) the odd factor is a random orthogonal matrix in a
Kronecker product.

This module knows the Llama block layout (``input_layernorm`` → q/k/v, ``o_proj``, ``post_attention_layernorm``
→ gate/up, ``down_proj``); families with other norms (LayerNorm centres, Gemma scales by ``1 + w``) are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from dgq.config import ConfigError

ROTATABLE = ("llama", "mistral", "qwen2")


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An ``n x n`` orthogonal float64 matrix: random signs · (Sylvester Hadamard ⊗ random orthogonal odd part)."""
    g = torch.Generator().manual_seed(seed)
    p = n & -n  # largest power of two dividing n
    had = torch.ones(1, 1, dtype=torch.float64)
    while had.shape[0] < p:
        had = torch.cat([torch.cat([had, had], 1), torch.cat([had, -had], 1)], 0)
    had /= p ** 0.5
    m = n // p
    if m > 1:
        q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        had = torch.kron(had.contiguous(), (q * torch.sign(torch.diagonal(r))[None, :]).contiguous())
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * had


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    """``L(x̂ · w) = (W · w) x̂``: move the norm's weight into its readers' columns and set it to 1."""
    w = norm.weight.detach().double()
    for lin in readers:
        lin.weight.data = (lin.weight.double() * w[None, :]).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _read(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.data = (lin.weight.double() @ q).to(lin.weight.dtype)


def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.data = (q.t() @ lin.weight.double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.double() @ q).to(lin.bias.dtype)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> None:
    """Rotate ``model``'s residual stream in place; the float model's outputs are unchanged (up to rounding).

    Tied input and output embeddings are untied (the final norm folds into the head only), and the model's config
    says so, so that a saved checkpoint reloads with both.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROTATABLE:
        raise ConfigError(f"rotation supports the Llama-family layout ({', '.join(ROTATABLE)}), not {model_type!r}")
    inner = model.model
    head = model.get_output_embeddings()
    if head.weight is inner.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    q = random_hadamard(model.config.hidden_size, seed).to(head.weight.device)
    for block in inner.layers:
        attn, mlp = block.self_attn, block.mlp
        _fold_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _read(lin, q)
        _write(attn.o_proj, q)
        _write(mlp.down_proj, q)
    _fold_norm(inner.norm, [head])
    _read(head, q)
    emb = inner.embed_tokens.weight
    emb.data = (emb.double() @ q).to(emb.dtype)
