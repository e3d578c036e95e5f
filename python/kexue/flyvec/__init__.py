"""FlyVec: binary word embeddings learned by a fruit-fly network (BioHash), end to end.

corpus -> :func:`read_sentences` -> :func:`build_vocabulary` -> :func:`context_windows` ->
:func:`train` (epochs of :func:`kexue.ops.biohash_update`, checkpoints) -> :class:`FlyVec`
(save/load, static and contextual hashes, nearest words). Command line: ``python -m kexue.flyvec``.
"""

from kexue.flyvec.model import FlyVec
from kexue.flyvec.storage import ModelFileError
from kexue.flyvec.tokenize import read_sentences, tokenize
from kexue.flyvec.trainer import TrainConfig, train
from kexue.flyvec.vocabulary import Vocabulary, build_vocabulary
from kexue.flyvec.windows import context_windows

__all__ = [
    "FlyVec",
    "ModelFileError",
    "TrainConfig",
    "Vocabulary",
    "build_vocabulary",
    "context_windows",
    "read_sentences",
    "tokenize",
    "train",
]
