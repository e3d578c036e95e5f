"""kexue.flyvec context hashes: a word's code voted from the hashed windows it is the target of."""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue import flyvec
from kexue.flyvec.__main__ import main
from kexue.flyvec.vocabulary import UNK
from tests.biohash.helpers import SMALL, TOPICS, topic_corpus


def _voted(monkeypatch, window_bits: list[list[int]], targets: list[int], contexts: int, k: int, K: int = 8):
    """context_hashes_from_windows with the windows' codes given (units per window), unpacked."""
    from kexue.flyvec import context
    from kexue.reference.biohash import unpack_bits

    words = [UNK, "a", "b", "c"]
    vocab = flyvec.Vocabulary(words, torch.tensor([1, 5, 5, 5]))
    V = len(words)
    model = flyvec.FlyVec(torch.randn(K, 2 * V, generator=torch.Generator().manual_seed(0)), vocab, k)
    codes = torch.zeros(len(window_bits), K, dtype=torch.uint8)
    for row, units in enumerate(window_bits):
        codes[row, units] = 1
    monkeypatch.setattr(context, "window_codes", lambda model, windows, k: codes)
    windows = torch.tensor([[1, t + V, 1] for t in targets], dtype=torch.int32)
    hashes = context.context_hashes_from_windows(model, windows, contexts, k)
    return model, unpack_bits(hashes, K)


def test_context_hash_is_the_vote_of_the_most_typical_windows(monkeypatch):
    # word 1: three windows agree on units 0, 1; one odd window has 5, 6
    bits = [[0, 1], [0, 1], [5, 6], [0, 1]]
    _, hashes = _voted(monkeypatch, bits, [1, 1, 1, 1], contexts=3, k=2)
    assert hashes[1].nonzero().flatten().tolist() == [0, 1]
    # profile: unit 0: 3, units 1 and 5: 2, unit 6: 1. Typicality (overlap with the profile):
    # [5,6] 3, [0,1] 5, [0,5] 5, [0,1] 5: with 3 of 4 windows voting, [5,6] is left out and unit 1
    # (2 votes) beats unit 5 (1 vote); with all 4 they tie (2 votes, the same rate): the lower index
    bits = [[5, 6], [0, 1], [0, 5], [0, 1]]
    for contexts in (3, 4, None):
        _, hashes = _voted(monkeypatch, bits, [1, 1, 1, 1], contexts=contexts, k=2)
        assert hashes[1].nonzero().flatten().tolist() == [0, 1]
    # one typical window: [0, 1] (the first of the equally typical ones)
    _, hashes = _voted(monkeypatch, bits, [1, 1, 1, 1], contexts=1, k=2)
    assert hashes[1].nonzero().flatten().tolist() == [0, 1]


def test_context_hash_prefers_units_specific_to_the_word(monkeypatch):
    # unit 7 wins every window of the corpus: the most votes for both words, but it says nothing
    # about either; unit 0 is word 1's own (2 of its 3 windows, none of word 2's)
    bits = [[7, 0], [7, 0], [7, 1], [7, 2], [7, 2], [7, 3]]
    model, hashes = _voted(monkeypatch, bits, [1, 1, 1, 2, 2, 2], contexts=None, k=1)
    assert hashes[1].nonzero().flatten().tolist() == [0]
    assert hashes[2].nonzero().flatten().tolist() == [2]
    from kexue.reference.biohash import unpack_bits

    static = unpack_bits(model.word_hashes(1), 8)
    assert torch.equal(hashes[3], static[3])  # word 3 is the target of no window: its static hash


def test_context_hash_arguments_are_checked(trained):
    from kexue.flyvec.context import context_hashes, context_hashes_from_windows

    _, model = trained
    windows = torch.tensor([[1, len(model.vocabulary) + 2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="contexts must be a positive int or None"):
        context_hashes_from_windows(model, windows, 0)
    with pytest.raises(ValueError, match="k must be an int"):
        context_hashes_from_windows(model, windows, 3, model.num_hidden + 1)
    with pytest.raises(ValueError, match="centre shifted by V"):
        context_hashes_from_windows(model, torch.tensor([[1, 2, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="no sentence of at least window"):
        context_hashes(model, ["apple banana"])


def test_context_hashes_group_words_by_topic(trained):
    from kexue.flyvec.context import context_hashes

    out, model = trained
    assert flyvec.FlyVec.load(out).config["window"] == SMALL.window  # what context hashes cut windows by
    codes = context_hashes(model, topic_corpus())
    assert codes.shape == model.word_hashes().shape
    assert (codes.to(torch.int32).bitwise_and(0xFF).sum() > 0).item()
    topic_of = {w: t for t, words in enumerate(TOPICS) for w in words}
    same, total = 0, 0
    for words in TOPICS:
        for word in words:
            query = codes[model.vocabulary.id(word)][None]
            _, idx = kexue.ops.hamming_topk(query, codes, 7)
            found = [model.vocabulary.words[i] for i in idx[0].tolist()]
            found = [w for w in found if w not in (word, UNK)][:5]
            same += sum(topic_of.get(w) == topic_of[word] for w in found)
            total += len(found)
    assert same / total > 0.8, same / total  # chance is ~1/3


def test_evaluate_context_hash_cli(tmp_path, trained, capsys):
    out, _ = trained
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(topic_corpus()) + "\n")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("apple\tbanana\t9.0\napple\tbus\t1.0\ncar\ttrain\t8.5\nred\tcar\t0.5\nblue\tgreen\t8.0\n")
    args = ["evaluate", str(out), str(pairs), "--similarity", "context-hash"]
    assert main([*args, "--corpus", str(corpus), "--contexts", "5"]) == 0
    printed = capsys.readouterr().out
    assert "pairs 5\tskipped 0" in printed
    assert float(printed.split("spearman ")[1].split()[0]) > 0.5  # same-topic pairs are the similar ones
    assert main(args) == 2
    assert "needs --corpus" in capsys.readouterr().err
    assert main(["evaluate", str(out), str(pairs), "--corpus", str(corpus)]) == 2
    assert "go with --similarity context-hash" in capsys.readouterr().err
    assert main(["neighbors", str(out), "apple", "-n", "4", "--corpus", str(corpus)]) == 0
    neighbours = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert len(neighbours) == 4 and sum(w in TOPICS[0] for w in neighbours) >= 3  # fruit near apple
    _, model = trained
    with pytest.raises(ValueError, match="codes must be uint8"):
        model.nearest("apple", 3, codes=torch.zeros(2, 3, dtype=torch.uint8))
