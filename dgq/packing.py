"""Bit packing of the 4-bit codes: two codes per byte, in the checkpoint's layout and in the in-memory one.

**Stored** (:func:`pack_u4`, the checkpoint's ``P.weight``): ``packed[k // 2, n]`` (uint8 ``[in / 2, out]``) holds
code ``u4[n, k]`` for even ``k`` in its low nibble and ``u4[n, k + 1]`` in its high nibble.  This is the layout
format version 2 fixed on disk; it does not change with the kernels.

**Tiled** (:func:`pack_tiled`, what :class:`dgq.nn.QuantLinear` holds and the CUDA kernels read):
``codes[n, :]`` (uint8 ``[out, in / 2]``, row-major) is cut into tiles of ``tile`` input channels; within a tile,
byte ``j`` holds ``k = j`` in its low nibble and ``k = tile / 2 + j`` in its high nibble.  A kernel tile is then
two int8 dots of depth ``tile / 2`` with no interleave, and a weight row is contiguous for the one-token GEMV
(:mod:`dgq.kernels.gemm` says why).  A layer holds its codes once, in this layout, so a model on the GPU carries
4 bits per weight and not a second copy for the kernels; the stored layout is produced only when saving.

The conversions are pure permutations of nibbles, so a checkpoint loads and saves back bit-identical.
"""

from __future__ import annotations

import torch


def layout_tile(in_features: int, group_size: int) -> int:
    """The tile of the in-memory layout: 128 input channels where ``in_features`` and the group allow it, 64 where
    they allow that (e.g. ``in_features`` 576), else the whole row (a shape the CUDA kernels refuse; the CPU
    reference runs any)."""
    if in_features % 2:
        raise ValueError(f"in_features must be even to pack 4-bit codes, got {in_features}")
    if in_features % 128 == 0 and group_size % 64 == 0:
        return 128
    if in_features % 64 == 0 and group_size % 32 == 0:
        return 64
    return in_features


def pack_u4(u4: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes ``[out, in]`` (values 0..15, ``in`` even) into the stored uint8 ``[in // 2, out]``."""
    if u4.shape[1] % 2:
        raise ValueError(f"in_features must be even to pack 4-bit codes, got {u4.shape[1]}")
    t = u4.t().contiguous()
    return (t[0::2] | (t[1::2] << 4)).contiguous()


def unpack_u4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_u4`: uint8 ``[in // 2, out]`` back to codes ``[out, in]``."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=1).reshape(-1, packed.shape[1]).t().contiguous()


def pack_tiled(u4: torch.Tensor, tile: int) -> torch.Tensor:
    """Pack uint8 codes ``[out, in]`` into the tiled uint8 ``[out, in // 2]`` (module docstring)."""
    n, k = u4.shape
    u = u4.reshape(n, k // tile, 2, tile // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_tiled(codes: torch.Tensor, tile: int) -> torch.Tensor:
    """Inverse of :func:`pack_tiled`: uint8 ``[out, in // 2]`` back to codes ``[out, in]``."""
    n, half = codes.shape
    c = codes.reshape(n, (2 * half) // tile, 1, tile // 2)
    return torch.cat((c & 0xF, c >> 4), dim=2).reshape(n, 2 * half)
