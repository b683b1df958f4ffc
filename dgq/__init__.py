"""dgq: Dual Grained Quantization (A8W4) for Hugging Face language models."""

__version__ = "0.1.0"
