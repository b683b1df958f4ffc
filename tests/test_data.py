"""Data folder discovery, the GPTQ joining of each evaluation set, calibration sampling, and the real files' hashes."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dgq.data import DATASETS, DataError, calibration_samples, data_root, load_eval_text, token_ids

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_HASHES = {
    "wikitext-2-raw/wiki.test.raw": "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
    "ptb/ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    "ptb/ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "c4/c4-validation.eval.jsonl": "ffa8ce32f608da046afc80e2625262cd0eabd39fd3f71acab4909ff4f4226cb2",
    "c4/c4-validation.calib.jsonl": "2f6c1e740141d25dc39d5c617ef5a4c4c64034eaa245b8ea98085a139e085a46",
}


def test_data_root_precedence(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv("DGQ_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("DGQ_DATA")
    assert data_root() == tmp_path / "shared" / "data"  # ../shared/data from the working directory


def test_wikitext_rows_keep_newline_and_join_with_blank_line(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = A = \n b c \n")
    assert load_eval_text("wikitext2", tmp_path) == " = A = \n\n\n b c \n"


def test_ptb_lines_stripped_and_joined_with_space(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" no it was n't \n black monday \n")
    assert load_eval_text("ptb", tmp_path) == "no it was n't black monday"


def test_c4_texts_joined_with_space(tmp_path):
    (tmp_path / "c4").mkdir()
    rows = [{"text": "one doc.", "url": "u"}, {"text": "two\ndoc.", "url": "v"}]
    (tmp_path / "c4" / "c4-validation.eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_eval_text("c4", tmp_path) == "one doc. two\ndoc."


def test_missing_file_names_dataset_path_and_remedy(tmp_path):
    with pytest.raises(DataError, match=r"ptb evaluation file not found at .*ptb\.test\.txt.*--data-dir.*DGQ_DATA"):
        load_eval_text("ptb", tmp_path)


def test_unknown_dataset_lists_known_ones(data_dir):
    with pytest.raises(DataError, match="known: wikitext2, ptb, c4"):
        load_eval_text("lambada", data_dir)


@pytest.mark.parametrize("seqlen", [64, 2000])  # 64: from long documents; 2000: from the joined documents
def test_calibration_shape_and_determinism(tokenizer, data_dir, seqlen):
    a = calibration_samples(tokenizer, nsamples=6, seqlen=seqlen, seed=3, root=data_dir)
    b = calibration_samples(tokenizer, nsamples=6, seqlen=seqlen, seed=3, root=data_dir)
    c = calibration_samples(tokenizer, nsamples=6, seqlen=seqlen, seed=4, root=data_dir)
    assert a.shape == (6, seqlen) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_calibration_windows_are_windows_of_the_joined_documents(tokenizer, data_dir):
    docs = [json.loads(line)["text"] for line in (data_dir / "c4" / "c4-validation.calib.jsonl").open()]
    ids = token_ids(tokenizer, "\n\n".join(docs))
    all_windows = ids.unfold(0, 2000, 1)
    for row in calibration_samples(tokenizer, nsamples=4, seqlen=2000, root=data_dir):
        assert (all_windows == row).all(dim=1).any()


def test_calibration_from_user_files(tokenizer, tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("quant group scale " * 40)
    assert calibration_samples(tokenizer, path=plain, nsamples=3, seqlen=50).shape == (3, 50)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"text": "abc " * 30}) + "\n\n" + json.dumps({"text": "xyz " * 30}) + "\n")
    assert calibration_samples(tokenizer, path=jsonl, nsamples=5, seqlen=100).shape == (5, 100)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("", "holds no text"), ("short", "fewer than one sequence of 64"),
    ('{"txt": 1}\n', "line 1: not a json object with a 'text' field"),
])
def test_calibration_errors(tokenizer, tmp_path, content, message):
    path = tmp_path / "calib.jsonl" if content and content.startswith("{") else tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        calibration_samples(tokenizer, path=path, nsamples=2, seqlen=64)


def test_default_calibration_file_missing(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"calibration file not found at .*c4-validation\.calib\.jsonl"):
        calibration_samples(tokenizer, root=tmp_path)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real data folder {REAL_DATA} is absent")
@pytest.mark.parametrize("relative", sorted(REAL_HASHES))
def test_real_data_hashes(relative):
    digest = hashlib.sha256((REAL_DATA / relative).read_bytes()).hexdigest()
    assert digest == REAL_HASHES[relative]


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real data folder {REAL_DATA} is absent")
def test_real_eval_texts_have_protocol_shape():
    texts = {name: load_eval_text(name, REAL_DATA) for name in DATASETS}
    assert texts["wikitext2"].count("\n\n") >= 2890 and texts["wikitext2"].startswith(" = Robert Boulter = \n\n\n")
    assert "\n" not in texts["ptb"] and texts["ptb"].startswith("no it was n't black monday but while")
    assert len(texts["c4"]) > 1_000_000
