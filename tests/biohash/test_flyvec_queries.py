"""kexue.flyvec queries and evaluation: hashes, nearest words, Spearman, the command line."""

from __future__ import annotations

import pytest
import torch

import kexue
from kexue import flyvec
from kexue.flyvec.__main__ import main
from tests.biohash.helpers import SMALL, topic_corpus


def test_static_and_contextual_hashes(trained):
    _, model = trained
    v = model.vocabulary
    V, k = len(v), model.hash_length
    code = model.word_hash("apple")
    expected = kexue.ops.biohash(torch.tensor([V + v.id("apple")]), torch.tensor([0, 1]), None, model.synapses, k)[0]
    assert torch.equal(code, expected) and int(kexue.reference.biohash.unpack_bits(code[None], 24).sum()) == k
    assert not model.word_hash("zebra").any()  # unknown word: all-zero code
    # contextual: the target in the second half, the rest as context
    sent = "red apple banana"
    ids = [v.id("red"), V + v.id("apple"), v.id("banana")]
    got = model.sentence_hash(sent, target="apple")
    assert torch.equal(got, kexue.ops.biohash(torch.tensor(ids), torch.tensor([0, 3]), None, model.synapses, k)[0])
    assert torch.equal(model.sentence_hash(sent, target=1), got)
    bag = model.sentence_hash(sent)
    assert torch.equal(
        bag,
        kexue.ops.biohash(torch.tensor([ids[0], ids[1] - V, ids[2]]), torch.tensor([0, 3]), None, model.synapses, k)[0],
    )
    with pytest.raises(ValueError, match="does not occur"):
        model.sentence_hash(sent, target="car")
    with pytest.raises(ValueError, match="no tokens"):
        model.sentence_hash("...")


def test_nearest_against_brute_force(trained):
    _, model = trained
    codes = model.word_hashes()
    q = model.vocabulary.id("bus")
    dist = kexue.reference.biohash.hamming_distances(codes[q : q + 1], codes)[0].tolist()
    order = sorted((i for i in range(1, len(dist)) if i != q), key=lambda i: (dist[i], i))[:6]
    assert model.nearest("bus", 6) == [(model.vocabulary.words[i], dist[i]) for i in order]
    with pytest.raises(KeyError, match="not in the vocabulary"):
        model.nearest("zebra")


def test_cli_train_and_neighbors(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(topic_corpus(sentences=120)))
    out = tmp_path / "model"
    rc = main(
        [
            "train",
            str(corpus),
            "--out",
            str(out),
            "--hidden",
            "24",
            "--window",
            "5",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--lr",
            "0.05",
            "--min-count",
            "2",
            "--hash-length",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0 and (out / "model.pt").is_file()
    assert "trained:" in capsys.readouterr().out
    assert main(["neighbors", str(out), "Apple", "-n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 2 for line in lines)
    assert main(["neighbors", str(out), "zebra"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "none.txt"), "--out", str(tmp_path / "other")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_spearman_against_the_textbook_formula():
    from kexue.flyvec.evaluate import ranks, spearman

    assert ranks(torch.tensor([10.0, 30.0, 20.0, 30.0])).tolist() == [1.0, 3.5, 2.0, 3.5]
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    d2 = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))  # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
    assert abs(spearman(a, b) - (1 - 6 * d2 / (5 * 24))) < 1e-12
    assert abs(spearman(a, [-x for x in a]) + 1) < 1e-12


def test_spearman_interval():
    import math

    from kexue.flyvec.evaluate import Score

    lo, hi = Score(0.29, 234, 119).ci95  # Fisher z: tanh(atanh(r) -+ 1.96 * 1.03 / sqrt(n - 3))
    half = 1.96 * 1.03 / math.sqrt(231)
    assert abs(lo - math.tanh(math.atanh(0.29) - half)) < 1e-12 and abs(hi - math.tanh(math.atanh(0.29) + half)) < 1e-12
    assert 0.15 < lo < 0.29 < hi < 0.42
    wide, narrow = Score(0.1, 50, 0).ci95, Score(0.1, 5000, 0).ci95
    assert wide[0] < narrow[0] < 0.1 < narrow[1] < wide[1]
    assert all(math.isnan(x) for x in Score(0.5, 3, 0).ci95)


def test_evaluate_pairs_and_cli(tmp_path, trained, capsys):
    from kexue.flyvec.evaluate import evaluate, read_pairs

    out, model = trained
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text(
        "# header\napple\tbanana\t9.0\napple\tbus\t1.0\ncar\ttrain\t8.5\nred\tcar\t0.5\n"
        "apple\tzebra\t5.0\nblue\tgreen\t8.0\nblue\tpear\t1.5\n"
    )
    assert len(read_pairs(pairs)) == 7
    score = evaluate(model, pairs)
    assert score.pairs == 6 and score.skipped == 1
    assert score.spearman > 0.5  # same-topic pairs are the similar ones, and the model learned topics
    assert evaluate(model, pairs, "dense").pairs == 6
    assert main(["evaluate", str(out), str(pairs)]) == 0
    printed = capsys.readouterr().out
    assert "pairs 6\tskipped 1" in printed and "95% [" in printed
    bad = tmp_path / "bad.tsv"
    bad.write_text("apple banana\n")
    with pytest.raises(ValueError, match="bad.tsv:1: expected"):
        read_pairs(bad)


def test_cli_refuses_bad_arguments(tmp_path, trained, capsys):
    out, _ = trained
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(topic_corpus(sentences=60)))
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", str(corpus), "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="out must be a folder"):
        flyvec.train(topic_corpus(), afile, SMALL, progress=False)
    for bad in (["--lr", "inf"], ["--lr", "nan"], ["--delta", "nan"], ["--lr", "-1"]):
        assert main(["train", str(corpus), "--out", str(tmp_path / "m"), *bad, "--no-progress"]) == 2
        assert "must be a" in capsys.readouterr().err, bad
    for n in ("-3", "0"):
        with pytest.raises(SystemExit) as exc:
            main(["neighbors", str(out), "apple", "-n", n])
        assert exc.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_evaluate_refuses_nan_scores_and_says_when_spearman_is_undefined(tmp_path, trained, capsys):
    from kexue.flyvec.evaluate import read_pairs

    out, model = trained
    nan = tmp_path / "nan.tsv"
    nan.write_text("apple\tbanana\t9.0\ncar\ttrain\tnan\n")
    with pytest.raises(ValueError, match="nan.tsv:2: the score must be a finite number"):
        read_pairs(nan)
    assert main(["evaluate", str(out), str(nan)]) == 2
    assert "finite number" in capsys.readouterr().err
    one = tmp_path / "one.tsv"
    one.write_text("apple\tbanana\t9.0\napple\tzebra\t1.0\n")
    assert main(["evaluate", str(out), str(one)]) == 1
    printed = capsys.readouterr().out
    assert "spearman undefined: only 1 pair(s)" in printed and "[nan" not in printed
    broken = tmp_path / "broken"
    synapses = model.synapses.clone()
    synapses[:, len(model.vocabulary) + model.vocabulary.id("apple")] = float("nan")  # apple's target column
    flyvec.FlyVec(synapses, model.vocabulary, model.hash_length).save(broken)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("apple\tbanana\t9.0\ncar\ttrain\t8.0\napple\tcar\t1.0\n")
    assert main(["evaluate", str(broken), str(pairs), "--similarity", "dense"]) == 2
    assert "not finite" in capsys.readouterr().err
