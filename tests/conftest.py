"""Shared fixtures, and the ``slow`` marker: slow tests (loading the real SmolLM2, ~45 s) run only with
``DGQ_SLOW=1`` so that a plain ``pytest`` stays fast; ``pytest -m "not slow"`` deselects them explicitly."""

import os

import pytest
import torch

from helpers import make_model, make_tokenizer, write_data_dir


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads real models; runs only with DGQ_SLOW=1")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run with pytest -m cuda")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("DGQ_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; set DGQ_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory with its tokenizer: what ``dgq quantize`` reads."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
