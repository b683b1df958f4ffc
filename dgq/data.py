"""Where evaluation and calibration text lives, and how it is read: one place for every data path.

Nothing is downloaded: files come from a data folder laid out like ``../shared/data`` (see its README). The folder
is chosen by an explicit argument (``--data-dir``), else ``$DGQ_DATA``, else the first ``shared/data`` folder found
beside the working directory or beside this repository, so the CLI works from the repo root and from elsewhere.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from dgq.errors import DGQError

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
    if not path.exists():
        raise DataError(f"{what} not found at {path} ({_HINT})")
    return path


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` with universal newlines (as ``Path.read_text`` reads it).

    Every way the file can be unusable (missing, a folder, unreadable, binary, not UTF-8) raises :class:`DataError`
    naming ``what`` and the file, so the user learns which of their files to fix.
    """
    if path.is_dir():
        raise DataError(f"{what} {path} is a directory, not a text file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise DataError(f"{what} {path} is not a text file (it holds NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
                        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_texts(path: Path, what: str) -> list[str]:
    """The ``text`` field of every non-blank json line."""
    texts = []
    for n, line in enumerate(read_text(path, what).split("\n"), 1):
        if line.strip():
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{what} {path}, line {n}: not a json object with a 'text' field") from None
            if not isinstance(text, str):
                raise DataError(f"{what} {path}, line {n}: 'text' is {type(text).__name__}, not a string")
            texts.append(text)
    return texts


def load_eval_text(name: str, root: str | Path | None = None) -> str:
    """The evaluation text of ``name``, joined as the GPTQ protocol does (see the data README).

    WikiText-2: the rows, each keeping its trailing newline, joined with "\\n\\n". PTB: the lines, stripped as the
    Hugging Face ``ptb_text_only`` sentences are, joined with " ". C4: the documents' ``text`` joined with " ".
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    what = f"{name} evaluation file"
    path = _data_file(_EVAL_FILES[name], what, root)
    if name == "c4":
        return " ".join(_jsonl_texts(path, what))
    text = read_text(path, what)
    if name == "wikitext2":
        return "\n\n".join(text.splitlines(keepends=True))
    return " ".join(line.strip() for line in text.splitlines())


def calibration_texts(path: str | Path | None = None, root: str | Path | None = None) -> list[str]:
    """Documents of a calibration file: ``.jsonl`` (a ``text`` field a line) or plain text (one document).

    ``path=None`` means the default C4 calibration half, which is disjoint from every evaluation file.
    """
    what = "calibration file"
    file = _data_file(CALIBRATION_FILE, what, root) if path is None else Path(path).expanduser().absolute()
    texts = _jsonl_texts(file, what) if file.suffix == ".jsonl" else [read_text(file, what)]
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
