"""dgq: Dual Grained Quantization (A8W4) for Hugging Face language models."""

__version__ = "0.1.0"

_API = {"load": "load", "save": "save", "quantize": "quantize_model", "evaluate": "evaluate", "export": "export"}


def __getattr__(name: str):  # lazy, so ``import dgq`` stays cheap (no transformers import)
    if name in _API:
        from dgq import api

        return getattr(api, _API[name])
    if name in ("QuantConfig", "preset"):
        from dgq import config

        return getattr(config, name)
    raise AttributeError(f"module 'dgq' has no attribute {name!r}")
