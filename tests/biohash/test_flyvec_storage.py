"""kexue.flyvec model files: save/load round trip, corrupt or truncated files, crash-safe writes."""

from __future__ import annotations

import os

import pytest
import torch

from kexue import flyvec
from kexue.flyvec import storage
from tests.biohash.helpers import SMALL, topic_corpus


def test_save_load_roundtrip(tmp_path, trained):
    _, model = trained
    model.save(tmp_path / "m.pt", epoch=4)
    back = flyvec.FlyVec.load(tmp_path / "m.pt")
    assert torch.equal(back.synapses, model.synapses) and back.vocabulary.words == model.vocabulary.words
    assert torch.equal(back.vocabulary.counts, model.vocabulary.counts) and back.hash_length == model.hash_length
    assert back.synapses.t().is_contiguous()  # input-major, as the kernels read it
    state = storage.load_state(tmp_path / "m.pt")
    assert state["format"] == "kexue.flyvec" and state["version"] == 1 and state["epoch"] == 4


def test_corrupt_or_truncated_files_give_clear_errors(tmp_path, trained):
    out, model = trained
    good = (out / "model.pt").read_bytes()
    bad = tmp_path / "model.pt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(storage.ModelFileError, match="corrupt or truncated"):
        flyvec.FlyVec.load(bad)
    bad.write_bytes(b"not a model at all")
    with pytest.raises(storage.ModelFileError, match="corrupt or truncated"):
        flyvec.FlyVec.load(bad)
    # a flipped byte inside the synapse data: the archive still reads, the checksum catches it
    state = torch.load(out / "model.pt", weights_only=True)
    state["synapses_t"][3, 4] += 1.0
    torch.save(state, bad)
    with pytest.raises(storage.ModelFileError, match="checksum"):
        flyvec.FlyVec.load(bad)
    torch.save({"format": "something else"}, bad)
    with pytest.raises(storage.ModelFileError, match="not a FlyVec model"):
        flyvec.FlyVec.load(bad)
    with pytest.raises(FileNotFoundError):
        flyvec.FlyVec.load(tmp_path / "nothing")
    # training on a folder whose checkpoint is damaged stops with the same clear error
    bad.write_bytes(good[:100])
    with pytest.raises(storage.ModelFileError):
        flyvec.train(topic_corpus(), tmp_path, SMALL, progress=False)


def test_failed_write_keeps_the_old_checkpoint(tmp_path, trained, monkeypatch):
    _, model = trained
    model.save(tmp_path, epoch=1)
    before = (tmp_path / "model.pt").read_bytes()

    def broken_save(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(storage.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path, epoch=2)
    assert (tmp_path / "model.pt").read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert storage.load_state(tmp_path)["epoch"] == 1


def test_killed_write_leftovers_are_removed(tmp_path):
    stale, fresh = tmp_path / ".tmp-killed.pt", tmp_path / ".tmp-writing.pt"
    for f in (stale, fresh):
        f.write_bytes(b"half a checkpoint")
    old = os.path.getmtime(stale) - 2 * storage.STALE_TMP_S
    os.utime(stale, (old, old))
    flyvec.train(topic_corpus(), tmp_path, SMALL, progress=False)
    assert not stale.exists()  # a write killed midway
    assert fresh.exists()  # young: perhaps another process's write in progress
    assert sorted(os.listdir(tmp_path)) == [".tmp-writing.pt", "model.pt"]
