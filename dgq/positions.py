"""Which rows of a block's activations are each sequence's first position, for layers with a first-position scale.

A :class:`~dgq.nn.QuantLinear` with ``act_first_scale`` quantizes the rows at position 0 (the attention sink) with a
static scale of their own.  The layer sees only ``[batch, tokens, features]``, which cannot tell a prefill from
position 0 apart from a decode step at position 57, so the decoder block says it: a forward pre-hook reads the
``position_ids`` (or ``cache_position``) that the model passes every block, and the mask of first-position rows
lives in a context variable for the length of the block's call.  The rule is fixed by position, never by the data,
so the two scales stay static.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from dgq.errors import DGQError

_FIRST_ROWS: ContextVar[torch.Tensor | None] = ContextVar("dgq_first_rows", default=None)
_HOOKED = "_dgq_first_position_hooks"


class PositionError(DGQError):
    """A first-position scale used where the block did not say which rows are first: the caller's model or call is
    missing the hooks or the position ids (a user's fix), not a bug in dgq."""


def first_rows(kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
    """Bool ``[batch * tokens]``: rows of ``hidden`` ``[batch, tokens, features]`` at position 0 of their sequence."""
    batch, tokens = hidden.shape[0], hidden.shape[1]
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = kwargs.get("cache_position")
    if positions is None:
        raise PositionError("a layer with a first-position activation scale needs the block's position_ids or "
                            "cache_position; this block was called without either")
    positions = positions.reshape(-1, positions.shape[-1]) if positions.dim() > 1 else positions.reshape(1, -1)
    if positions.shape[-1] != tokens or positions.shape[0] not in (1, batch):
        raise PositionError(f"position ids of shape {tuple(positions.shape)} do not match hidden states of "
                            f"{batch} x {tokens} tokens")
    return (positions == 0).expand(batch, tokens).reshape(-1)


def current_first_rows(rows: int) -> torch.Tensor:
    """The mask set by the enclosing block's hook, checked against the ``rows`` of the caller's input."""
    mask = _FIRST_ROWS.get()
    if mask is None:
        raise PositionError("a layer with a first-position activation scale ran outside a hooked decoder block; "
                            "call dgq.positions.install(blocks) on the model's blocks first")
    if mask.numel() != rows:
        raise PositionError(f"the block's position mask covers {mask.numel()} rows, the layer's input has {rows}")
    return mask


def install(blocks: list[nn.Module] | nn.ModuleList) -> None:
    """Hook every block (once) so that the layers inside it know which rows are first positions."""
    for block in blocks:
        if getattr(block, _HOOKED, False):
            continue

        tokens: list = []  # one per call in flight; kept here, not on the block, so the block stays copyable

        def enter(_module: nn.Module, args: tuple, kwargs: dict[str, Any], tokens: list = tokens) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens.append(_FIRST_ROWS.set(first_rows(kwargs, hidden)))

        def leave(_module: nn.Module, _args: tuple, _kwargs: dict[str, Any], _out: Any, tokens: list = tokens) -> None:
            if tokens:  # empty when ``enter`` refused the call
                _FIRST_ROWS.reset(tokens.pop())

        block.register_forward_pre_hook(enter, with_kwargs=True)
        block.register_forward_hook(leave, with_kwargs=True, always_call=True)
        setattr(block, _HOOKED, True)
