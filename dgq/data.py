"""Where evaluation and calibration text lives, and how it is read: one place for every data path.

Nothing is downloaded: files come from a data folder laid out like ``../shared/data`` (see its README). The folder
is chosen by an explicit argument (``--data-dir``), else ``$DGQ_DATA``, else the first ``shared/data`` folder found
beside the working directory or beside this repository, so the CLI works from the repo root and from elsewhere.
"""

from __future__ import annotations

from dgq.errors import DGQError
import json
import os
import random
from pathlib import Path

import torch

DATASETS = ("wikitext2", "ptb", "c4")
_EVAL_FILES = {"wikitext2": "wikitext-2-raw/wiki.test.raw", "ptb": "ptb/ptb.test.txt",
               "c4": "c4/c4-validation.eval.jsonl"}
CALIBRATION_FILE = "c4/c4-validation.calib.jsonl"
_HINT = "point --data-dir or $DGQ_DATA at the data folder"


class DataError(DGQError, ValueError):
    """Missing or unusable data; the message says what was looked for and where."""


def data_root(override: str | Path | None = None) -> Path:
    """The data folder: ``override``, else ``$DGQ_DATA``, else ``../shared/data`` from the working directory, else
    ``shared/data`` beside the repository (the parent of the ``dgq`` package's folder).

    When no candidate exists the first one is returned, so the caller's error names a concrete path.
    """
    if override is not None:
        return Path(override).expanduser().absolute()
    if os.environ.get("DGQ_DATA"):
        return Path(os.environ["DGQ_DATA"]).expanduser().absolute()
    repo = Path(__file__).resolve().parent.parent
    candidates = [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def _data_file(relative: str, what: str, root: str | Path | None) -> Path:
    path = data_root(root) / relative
    if not path.is_file():
        raise DataError(f"{what} not found at {path} ({_HINT})")
    return path


def _jsonl_texts(path: Path) -> list[str]:
    """The ``text`` field of every non-blank json line."""
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
    """The evaluation text of ``name``, joined as the GPTQ protocol does (see the data README).

    WikiText-2: the rows, each keeping its trailing newline, joined with "\\n\\n". PTB: the lines, stripped as the
    Hugging Face ``ptb_text_only`` sentences are, joined with " ". C4: the documents' ``text`` joined with " ".
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    path = _data_file(_EVAL_FILES[name], f"{name} evaluation file", root)
    if name == "c4":
        return " ".join(_jsonl_texts(path))
    text = path.read_text(encoding="utf-8")
    if name == "wikitext2":
        return "\n\n".join(text.splitlines(keepends=True))
    return " ".join(line.strip() for line in text.splitlines())


def calibration_texts(path: str | Path | None = None, root: str | Path | None = None) -> list[str]:
    """Documents of a calibration file: ``.jsonl`` (a ``text`` field a line) or plain text (one document).

    ``path=None`` means the default C4 calibration half, which is disjoint from every evaluation file.
    """
    if path is None:
        file = _data_file(CALIBRATION_FILE, "calibration file", root)
    else:
        file = Path(path).expanduser().absolute()
        if not file.is_file():
            raise DataError(f"calibration file {file} does not exist")
    texts = _jsonl_texts(file) if file.suffix == ".jsonl" else [file.read_text(encoding="utf-8")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"calibration file {file} holds no text")
    return texts


def token_ids(tokenizer, text: str) -> torch.Tensor:  # noqa: ANN001
    """1-D token ids; ``verbose=False`` silences the "longer than model_max_length" warning for long texts."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


def calibration_samples(tokenizer, path: str | Path | None = None, nsamples: int = 128,  # noqa: ANN001
                        seqlen: int = 2048, seed: int = 0, root: str | Path | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids: random windows of the calibration text, the same for the same ``seed``.

    As GPTQ does for C4, each sample is a random window of a random document that holds at least ``seqlen`` tokens
    (documents are visited in a seeded random order, each at most once). Real corpora often have too few such long
    documents (C4 at 2048 tokens), so the remaining samples are random windows of all documents joined with blank
    lines, which keeps every sample a full ``seqlen`` of real text.
    """
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    rng = random.Random(seed)
    docs = calibration_texts(path, root)
    order = list(range(len(docs)))
    rng.shuffle(order)
    samples: list[torch.Tensor] = []
    for i in order:
        if len(samples) == nsamples:
            break
        ids = token_ids(tokenizer, docs[i])
        if ids.numel() >= seqlen:
            start = rng.randint(0, ids.numel() - seqlen)
            samples.append(ids[start:start + seqlen])
    if len(samples) < nsamples:
        ids = token_ids(tokenizer, "\n\n".join(docs))
        if ids.numel() < seqlen:
            raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seqlen}")
        while len(samples) < nsamples:
            start = rng.randint(0, ids.numel() - seqlen)
            samples.append(ids[start:start + seqlen])
    return torch.stack(samples)
