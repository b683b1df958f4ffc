"""Model-family adapters: where the decoder blocks are and which producer feeds which linears."""

from dgq.models.adapters import Adapter, SmoothPair, UnsupportedModelError, adapter_for

__all__ = ["Adapter", "SmoothPair", "UnsupportedModelError", "adapter_for"]
