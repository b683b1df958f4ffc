"""Bit packing of the 4-bit codes: two codes per byte, laid out for the GEMM kernel's loads.

Layout: ``packed[k // 2, n]`` (uint8 ``[in / 2, out]``) holds code ``u4[n, k]`` for even ``k`` in its low nibble and
``u4[n, k + 1]`` in its high nibble.

How the kernels use it (:mod:`dgq.kernels.gemm`): they read the transpose ``[out, in / 2]`` (K-major: one
output row's codes contiguous, as int8 tensor cores want their operands), derived once per layer and cached;
tiles of ``BLOCK_K`` codes lie in one group, so a tile needs a single ``s2`` and ``zp`` per output.  The nibbles
are not interleaved back into K order: the kernel splits the int8 activation tile into its even and odd columns
and runs one dot per nibble half.  Storing the K-major layout itself would save that cached copy (a checkpoint
format change: ``FORMAT_VERSION`` in ``dgq/checkpoint.py``).
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
