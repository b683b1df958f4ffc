"""dgq: Dual Grained Quantization (A8W4) for Hugging Face language models.

Importing dgq registers its quantization method with transformers (:mod:`dgq.hf`), so that
``AutoModelForCausalLM.from_pretrained`` and ``save_pretrained`` read and write dgq checkpoints; the rest of the
package loads lazily.
"""

from dgq.hf import register as _register

__version__ = "0.1.0"
_register()

_API = {"load": "load", "save": "save", "quantize": "quantize_model", "evaluate": "evaluate", "export": "export"}


def __getattr__(name: str):  # noqa: ANN201 - lazy: the pipeline's modules load on first use
    if name in _API:
        from dgq import api

        return getattr(api, _API[name])
    if name in ("QuantConfig", "preset"):
        from dgq import config

        return getattr(config, name)
    raise AttributeError(f"module 'dgq' has no attribute {name!r}")
