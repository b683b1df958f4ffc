import pytest
import torch

from helpers import make_tokenizer, write_data_dir


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return write_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()
