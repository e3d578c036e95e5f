"""The model file: format, atomic writes, and loading with clear errors.

``DIR/model.pt`` is a ``torch.save`` archive (read back with ``weights_only=True``) of one dict:

=============  ===============================================================================
``format``     ``"kexue.flyvec"``
``version``    ``1``
``synapses_t`` float32 ``(2V, K)`` contiguous: the transpose of the synapses ``W (K, 2V)``;
               row ``i < V`` is context word i, row ``V + i`` target word i
``words``      list of V str, id order; ``words[0] == "<UNK>"``
``counts``     int64 ``(V,)`` corpus counts
``epoch``      epochs completed (training resumes from there)
``config``     dict of the training settings (:class:`kexue.flyvec.trainer.TrainConfig`)
``checksum``   sha256 (hex) of the synapse bytes, the words and the epoch
=============  ===============================================================================

Writes go to a temporary file in the same folder, are flushed to disk, and then replace the old
file with ``os.replace`` (atomic on POSIX): an interrupted write leaves the previous file intact.
A process killed mid-write cannot remove its temporary file; training removes such leftovers
(``.tmp-*.pt`` older than a minute) from its folder when it starts.
A file that is truncated, corrupt or not a model raises :class:`ModelFileError` naming the path.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
import time
from typing import Any

import torch

FORMAT = "kexue.flyvec"
VERSION = 1
MODEL_FILE = "model.pt"
TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".pt"
STALE_TMP_S = 60.0  # a temporary file this old is no write in progress (a write takes seconds)


class ModelFileError(ValueError):
    """A model file is missing pieces, corrupt, truncated, or of another format."""


def checksum(synapses_t: torch.Tensor, words: list[str], epoch: int) -> str:
    h = hashlib.sha256()
    h.update(synapses_t.contiguous().numpy().tobytes())
    h.update("\n".join(words).encode("utf-8"))
    h.update(str(epoch).encode())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save(payload)`` to ``path`` through a temporary file and ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: str | os.PathLike, older_than_s: float = STALE_TMP_S) -> list[str]:
    """Delete the temporary files of writes that were killed midway (``.tmp-*.pt`` in ``folder``
    not modified for ``older_than_s`` seconds; younger ones may be another process's write in
    progress). Returns the paths removed."""
    removed = []
    now = time.time()
    for tmp in glob.glob(os.path.join(glob.escape(os.fspath(folder)), f"{TMP_PREFIX}*{TMP_SUFFIX}")):
        try:
            if now - os.path.getmtime(tmp) >= older_than_s:
                os.unlink(tmp)
                removed.append(tmp)
        except FileNotFoundError:  # its writer finished or another cleaner got there first
            pass
    return removed


def save_state(
    path, synapses_t: torch.Tensor, words: list[str], counts: torch.Tensor, epoch: int, config: dict[str, Any]
) -> None:
    wt = synapses_t.detach().to("cpu", torch.float32).contiguous()
    write_atomic(
        path,
        {
            "format": FORMAT,
            "version": VERSION,
            "synapses_t": wt,
            "words": list(words),
            "counts": counts.to(torch.int64).cpu(),
            "epoch": int(epoch),
            "config": dict(config),
            "checksum": checksum(wt, list(words), int(epoch)),
        },
    )


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """The validated dict of a model file (see the module docstring)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FlyVec model at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip errors, unpickling errors, EOF: all mean a damaged file
        raise ModelFileError(
            f"{path!r} is not a readable FlyVec model file (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not a FlyVec model file (format {FORMAT!r} expected)")
    if state.get("version") != VERSION:
        raise ModelFileError(f"{path!r} has format version {state.get('version')!r}; this kexue reads {VERSION}")
    missing = [k for k in ("synapses_t", "words", "counts", "epoch", "config", "checksum") if k not in state]
    if missing:
        raise ModelFileError(f"{path!r} lacks {', '.join(missing)}")
    wt, words, counts = state["synapses_t"], state["words"], state["counts"]
    V = len(words)
    if not (isinstance(wt, torch.Tensor) and wt.dim() == 2 and wt.shape[0] == 2 * V and wt.dtype == torch.float32):
        raise ModelFileError(
            f"{path!r}: synapses_t must be float32 (2V, K) = ({2 * V}, K), got {getattr(wt, 'shape', None)}"
        )
    if not (isinstance(counts, torch.Tensor) and counts.shape == (V,)):
        raise ModelFileError(f"{path!r}: counts must have one entry per word")
    if checksum(wt, words, state["epoch"]) != state["checksum"]:
        raise ModelFileError(f"{path!r} is corrupt: the checksum of its contents does not match")
    return state
