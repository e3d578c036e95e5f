"""kexue.flyvec input pipeline: tokenizing, sentences, vocabulary counts, context windows."""

from __future__ import annotations

import pytest
import torch

from kexue import flyvec
from kexue.flyvec.vocabulary import UNK


def test_tokenize():
    assert flyvec.tokenize("The cat's 3 mats, 1,000.5 Äpfel!") == ["the", "cat's", "<NUM>", "mats", "<NUM>", "äpfel"]
    assert flyvec.tokenize("  ... ") == []


def test_read_sentences_from_lines_and_files(tmp_path):
    lines = ["One two", "", "three  FOUR five"]
    assert list(flyvec.read_sentences(lines)) == [["one", "two"], ["three", "four", "five"]]
    plain = tmp_path / "c.txt"
    plain.write_text("\n".join(lines))
    import bz2

    packed = tmp_path / "c.txt.bz2"
    packed.write_bytes(bz2.compress("\n".join(lines).encode()))
    assert list(flyvec.read_sentences(plain)) == list(flyvec.read_sentences(str(packed)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(flyvec.read_sentences(tmp_path / "missing.txt"))
    with pytest.raises(TypeError, match="lines must be str"):
        list(flyvec.read_sentences([b"bytes"]))


def test_vocabulary_counts_order_and_min_count():
    sents = [["b", "a", "b", "c"], ["a", "b", "d", "e"], ["e", "a"]]
    v = flyvec.build_vocabulary(sents, min_count=2)
    assert v.words == [UNK, "a", "b", "e"]  # by count, ties alphabetically
    assert v.counts.tolist() == [2, 3, 3, 2]  # <UNK> counts c and d
    assert v.encode(["a", "zzz", "e"]) == [1, 0, 3]
    assert "a" in v and "zzz" not in v and UNK not in v
    torch.testing.assert_close(v.inverse_frequency(), 1.0 / v.counts.double())
    assert flyvec.build_vocabulary(sents, min_count=1, max_size=2).words == [UNK, "a", "b"]
    with pytest.raises(ValueError, match="corpus is empty"):
        flyvec.build_vocabulary([], min_count=1)
    with pytest.raises(ValueError, match="no word occurs at least min_count=9"):
        flyvec.build_vocabulary(sents, min_count=9)
    with pytest.raises(ValueError, match="min_count"):
        flyvec.build_vocabulary(sents, min_count=0)


def test_context_windows():
    w = flyvec.context_windows([[1, 2, 3, 4, 2], [5, 6], [7, 7, 7]], vocab_size=10, size=3)
    assert w.tolist() == [[1, 12, 3], [2, 13, 4], [3, 14, 2], [7, 17, 7]]  # short sentences give none
    assert flyvec.context_windows([[1]], 10, size=3).shape == (0, 3)
    with pytest.raises(ValueError, match="window size"):
        flyvec.context_windows([[1]], 10, size=0)
