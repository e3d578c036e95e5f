"""Text -> sentences of tokens.

FlyVec's released model is lower-cased words with numbers folded into one token ``<NUM>``; we do
the same: a token is a run of letters (apostrophes inside a word kept), or a number (``<NUM>``).
Each input line is one sentence. A path may name a plain, ``.gz`` or ``.bz2`` text file.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
from collections.abc import Iterable, Iterator

NUM = "<NUM>"
_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*|\d+(?:[.,]\d+)*")


def tokenize(line: str) -> list[str]:
    """Lower-cased word tokens of one line; every number becomes ``<NUM>``."""
    return [NUM if t[0].isdigit() else t for t in _TOKEN.findall(line.lower())]


def _open_text(path: str | os.PathLike):
    path = os.fspath(path)
    if path.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", errors="replace")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_sentences(source: str | os.PathLike | Iterable[str]) -> Iterator[list[str]]:
    """Tokenized sentences (one per line, empty lines dropped) of a file path or an iterable of lines."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"corpus file {os.fspath(source)!r} does not exist")
        with _open_text(source) as f:
            yield from _sentences(f)
    else:
        if isinstance(source, bytes):
            raise TypeError("corpus must be a path or an iterable of str lines, got bytes")
        yield from _sentences(source)


def _sentences(lines: Iterable[str]) -> Iterator[list[str]]:
    for line in lines:
        if not isinstance(line, str):
            raise TypeError(f"corpus lines must be str, got {type(line).__name__}")
        tokens = tokenize(line)
        if tokens:
            yield tokens
