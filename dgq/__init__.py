"""dgq: Dual Grained Quantization (A8W4) for Hugging Face language models."""

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy, so ``import dgq`` stays cheap (no transformers import)
    if name in ("load", "save"):
        from dgq import checkpoint

        return getattr(checkpoint, name)
    if name == "quantize":
        from dgq.api import quantize_model

        return quantize_model
    if name in ("QuantConfig", "preset"):
        from dgq import config

        return getattr(config, name)
    raise AttributeError(f"module 'dgq' has no attribute {name!r}")
