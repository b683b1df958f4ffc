"""Bit packing of the 4-bit codes: two codes per byte, laid out for the GEMM kernel's loads.

Layout: ``packed[k // 2, n]`` (uint8 ``[in / 2, out]``) holds code ``u4[n, k]`` for even ``k`` in its low nibble and
``u4[n, k + 1]`` in its high nibble.

Why this layout (:mod:`dgq.kernels.gemm`): a kernel tile of ``BLOCK_K`` rows of K and ``BLOCK_N`` outputs is
``BLOCK_K / 2`` rows of contiguous bytes along N, so every load is coalesced and, with ``BLOCK_K`` dividing the
group size, one tile lies in one group and needs a single row of ``s2`` and ``zp``.  The nibbles are not
interleaved back into K order; the kernel instead splits the int8 activation tile into its even and odd columns
(a free register split) and runs one dot per nibble half.
"""

from __future__ import annotations

import torch


def pack_u4(u4: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes ``[out, in]`` (values 0..15, ``in`` even) into uint8 ``[in // 2, out]``."""
    if u4.shape[1] % 2:
        raise ValueError(f"in_features must be even to pack 4-bit codes, got {u4.shape[1]}")
    t = u4.t().contiguous()
    return (t[0::2] | (t[1::2] << 4)).contiguous()


def unpack_u4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_u4`: uint8 ``[in // 2, out]`` back to codes ``[out, in]``."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=1).reshape(-1, packed.shape[1]).t().contiguous()
