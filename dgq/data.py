"""Where evaluation and calibration text lives, and how it is read: one place for every data path.

Nothing is downloaded: files come from a data folder laid out like ``../shared/data`` (see its README), chosen by
an explicit argument, else ``$DGQ_DATA``, else ``../shared/data`` beside the working directory or the repository.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

DATASETS = ("wikitext2", "ptb", "c4")
_FILES = {"wikitext2": "wikitext-2-raw/wiki.test.raw", "ptb": "ptb/ptb.test.txt", "c4": "c4/c4-validation.eval.jsonl"}
CALIBRATION_FILE = "c4/c4-validation.calib.jsonl"


class DataError(ValueError):
    """Missing or unusable data; the message says what was looked for and where."""


def data_root(override: str | Path | None = None) -> Path:
    """The data folder: ``override``, else ``$DGQ_DATA``, else the first ``shared/data`` found beside the working
    directory or beside this repository."""
    if override is not None:
        return Path(override).expanduser()
    if os.environ.get("DGQ_DATA"):
        return Path(os.environ["DGQ_DATA"]).expanduser()
    repo = Path(__file__).resolve().parent.parent
    candidates = [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _data_file(relative: str, what: str, root: str | Path | None) -> Path:
    path = data_root(root) / relative
    if not path.is_file():
        raise DataError(f"{what} not found at {path} (point --data-dir or $DGQ_DATA at the data folder)")
    return path


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{n} is not a json line with a 'text' field") from None
    return texts


def load_eval_text(name: str, root: str | Path | None = None) -> str:
    """The evaluation text of ``name`` joined as GPTQ does: WikiText-2 rows with "\\n\\n", PTB lines and C4
    documents with " "."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    path = _data_file(_FILES[name], f"{name} evaluation file", root)
    if name == "c4":
        return " ".join(_jsonl_texts(path))
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if name == "wikitext2":
        return "\n\n".join(lines)
    return " ".join(lines)


def calibration_texts(path: str | Path | None = None, root: str | Path | None = None) -> list[str]:
    """Documents of a calibration file: ``.jsonl`` (a ``text`` field a line) or plain text (one document)."""
    if path is None:
        file = _data_file(CALIBRATION_FILE, "calibration file", root)
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"calibration file {file} does not exist")
    texts = _jsonl_texts(file) if file.suffix == ".jsonl" else [file.read_text(encoding="utf-8")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"calibration file {file} holds no text")
    return texts


def calibration_samples(tokenizer, path: str | Path | None = None, nsamples: int = 128,  # noqa: ANN001
                        seqlen: int = 2048, seed: int = 0, root: str | Path | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids: random windows of the calibration text, deterministic for ``seed``.

    As GPTQ does for C4, each sample is a random window of a random document long enough to hold it; where too few
    documents are that long, windows are drawn from all documents joined with blank lines instead.
    """
    rng = random.Random(seed)
    docs = calibration_texts(path, root)
    order = list(range(len(docs)))
    rng.shuffle(order)
    samples: list[torch.Tensor] = []
    for i in order:
        if len(samples) == nsamples:
            break
        ids = tokenizer(docs[i], return_tensors="pt").input_ids[0]
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            samples.append(ids[start:start + seqlen])
    if len(samples) < nsamples:
        ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
        if ids.numel() < seqlen:
            raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seqlen}")
        while len(samples) < nsamples:
            start = rng.randint(0, ids.numel() - seqlen)
            samples.append(ids[start:start + seqlen])
    return torch.stack(samples)
