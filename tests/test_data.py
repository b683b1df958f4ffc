"""Data paths, the GPTQ text protocol, calibration sampling, and the real data's hashes."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dgq.data import DataError, calibration_samples, data_root, load_eval_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HASHES = {
    "wikitext-2-raw/wiki.test.raw": "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
    "ptb/ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    "c4/c4-validation.eval.jsonl": "ffa8ce32f608da046afc80e2625262cd0eabd39fd3f71acab4909ff4f4226cb2",
    "c4/c4-validation.calib.jsonl": "2f6c1e740141d25dc39d5c617ef5a4c4c64034eaa245b8ea98085a139e085a46",
}


def test_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DGQ_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "flag") == tmp_path / "flag"


def test_protocol_joins(data_dir):
    wiki = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines(keepends=True)
    assert load_eval_text("wikitext2", data_dir) == "\n\n".join(wiki)
    ptb = (data_dir / "ptb" / "ptb.test.txt").read_text().splitlines(keepends=True)
    assert load_eval_text("ptb", data_dir) == " ".join(ptb)
    docs = [json.loads(line)["text"] for line in (data_dir / "c4" / "c4-validation.eval.jsonl").open()]
    assert load_eval_text("c4", data_dir) == " ".join(docs)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"ptb evaluation file not found at {tmp_path}/ptb/ptb.test.txt"):
        load_eval_text("ptb", tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'wiki'"):
        load_eval_text("wiki", tmp_path)


def test_calibration_is_deterministic_and_exact_size(tokenizer, data_dir):
    a = calibration_samples(tokenizer, nsamples=6, seqlen=64, seed=3, root=data_dir)
    b = calibration_samples(tokenizer, nsamples=6, seqlen=64, seed=3, root=data_dir)
    c = calibration_samples(tokenizer, nsamples=6, seqlen=64, seed=4, root=data_dir)
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_falls_back_to_joined_text(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("tiny text " * 40)
    out = calibration_samples(tokenizer, path=short, nsamples=3, seqlen=100)
    assert out.shape == (3, 100)
    with pytest.raises(DataError, match="fewer than one sequence of 1000"):
        calibration_samples(tokenizer, path=short, nsamples=1, seqlen=1000)
    with pytest.raises(DataError, match="does not exist"):
        calibration_samples(tokenizer, path=tmp_path / "nope.jsonl")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present on this machine")
@pytest.mark.parametrize("relative", sorted(HASHES))
def test_real_data_hashes(relative):
    assert hashlib.sha256((SHARED / relative).read_bytes()).hexdigest() == HASHES[relative]
