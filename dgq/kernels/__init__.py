"""Triton kernels for the A8W4 dual-grained Linear (CUDA; tests run them in Triton's CPU interpreter).

Importing this package needs no Triton; :data:`TRITON_AVAILABLE` says whether the kernel modules can load.
"""

from __future__ import annotations

import importlib.util

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
