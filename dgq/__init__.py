"""dgq: Dual Grained Quantization (A8W4) for Hugging Face language models."""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy, so ``import dgq`` stays cheap (no transformers import)
    if name in ("load", "save"):
        from dgq import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'dgq' has no attribute {name!r}")
