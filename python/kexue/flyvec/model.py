"""A trained FlyVec model: synapses and vocabulary, and the queries on them.

- :meth:`FlyVec.word_hash`: the static hash of a word: the code of the input whose context half
  is empty and whose target half is the word (spec §1.1).
- :meth:`FlyVec.sentence_hash`: the contextual hash of a word in a sentence (the rest of the
  sentence is its context), or of a whole sentence as a bag of context words.
- :meth:`FlyVec.nearest`: the words whose static hashes are nearest in Hamming distance.
- :func:`kexue.flyvec.context.context_hashes`: a word's code voted from the hashed windows it
  occurs in (better word similarity than static hashes on a small corpus; docs/flyvec.md).

Codes are packed uint8 rows (see :func:`kexue.ops.biohash`); an unknown word's code is all zeros
(as in the flyvec package).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

import kexue.ops
from kexue._biohash_codes import code_bytes
from kexue.flyvec import storage
from kexue.flyvec.tokenize import tokenize
from kexue.flyvec.vocabulary import Vocabulary

DEFAULT_HASH_LENGTH = 50  # flyvec/core.py's default


class FlyVec:
    """Synapses ``W (K, 2V)`` (stored input-major) and the vocabulary they were trained on."""

    def __init__(
        self,
        synapses: torch.Tensor,
        vocabulary: Vocabulary,
        hash_length: int = DEFAULT_HASH_LENGTH,
        config: dict | None = None,
    ):
        if synapses.dim() != 2 or synapses.shape[1] != 2 * len(vocabulary):
            raise ValueError(f"synapses must be (K, 2V) = (K, {2 * len(vocabulary)}), got {tuple(synapses.shape)}")
        self.synapses = synapses
        self.vocabulary = vocabulary
        self.hash_length = int(hash_length)
        # the training settings (window size, stop words, ...), as the model file holds them; what
        # context hashes need to cut and weigh a corpus's windows as training did
        self.config = dict(config or {})
        # static codes per k, valid while the synapses are unchanged: training updates them in
        # place, which bumps the tensor's version counter and so drops these
        self._static: dict[int, torch.Tensor] = {}
        self._static_version = -1

    @property
    def num_hidden(self) -> int:
        return self.synapses.shape[0]

    def _k(self, k: int | None) -> int:
        return self.hash_length if k is None else k

    # ---- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, epoch: int = 0, config: dict | None = None) -> None:
        """Write the model (a folder, or a file path) atomically; see :mod:`kexue.flyvec.storage`."""
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".pt"):
            path = os.path.join(path, storage.MODEL_FILE)
        cfg = dict(config if config is not None else self.config)
        cfg.setdefault("hash_length", self.hash_length)
        storage.save_state(path, self.synapses.t(), self.vocabulary.words, self.vocabulary.counts, epoch, cfg)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FlyVec:
        """Read a model written by :meth:`save` or by training (a folder or a file)."""
        state = storage.load_state(path)
        vocab = Vocabulary(list(state["words"]), state["counts"])
        config = state["config"]
        return cls(state["synapses_t"].t(), vocab, config.get("hash_length", DEFAULT_HASH_LENGTH), config)

    # ---- queries -----------------------------------------------------------------------------

    def word_hashes(self, k: int | None = None) -> torch.Tensor:
        """Static codes of every vocabulary id, ``(V, ceil(K/8))`` uint8 (id 0, ``<UNK>``, included)."""
        k = self._k(k)
        if self._static_version != self.synapses._version:
            self._static.clear()
            self._static_version = self.synapses._version
        if k not in self._static:
            V = len(self.vocabulary)
            ids = torch.arange(V, 2 * V)
            self._static[k] = kexue.ops.biohash(ids, torch.arange(V + 1), None, self.synapses, k)
        return self._static[k]

    def word_hash(self, word: str, k: int | None = None) -> torch.Tensor:
        """The static code of ``word`` (all zeros if it is not in the vocabulary)."""
        if word not in self.vocabulary:
            return torch.zeros(code_bytes(self.num_hidden), dtype=torch.uint8)
        return self.word_hashes(k)[self.vocabulary.id(word)]

    def sentence_hash(
        self, sentence: str | Sequence[str], target: str | int | None = None, k: int | None = None
    ) -> torch.Tensor:
        """The contextual code of a sentence.

        ``target``: the word (or its position in the tokenized sentence) whose contextual hash is
        wanted: it fills the target half, every other token the context half. None: the whole
        sentence is context (no target). Out-of-vocabulary tokens count as ``<UNK>``.
        """
        tokens = tokenize(sentence) if isinstance(sentence, str) else list(sentence)
        if not tokens:
            raise ValueError("sentence has no tokens")
        ids = self.vocabulary.encode(tokens)
        V = len(self.vocabulary)
        pos = None
        if isinstance(target, str):
            if target not in tokens:
                raise ValueError(f"target {target!r} does not occur in the sentence {tokens}")
            pos = tokens.index(target)
        elif target is not None:
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(tokens):
                raise ValueError(f"target position must lie in [0, {len(tokens)}), got {target!r}")
            pos = target
        row = [i + V if j == pos else i for j, i in enumerate(ids)]
        codes = kexue.ops.biohash(torch.tensor(row), torch.tensor([0, len(row)]), None, self.synapses, self._k(k))
        return codes[0]

    def nearest(
        self, word: str, n: int = 10, k: int | None = None, codes: torch.Tensor | None = None
    ) -> list[tuple[str, int]]:
        """The ``n`` words nearest to ``word`` by Hamming distance of static codes (or of
        ``codes``, one packed row per vocabulary id, e.g. context hashes):
        ``[(word, distance), ...]``, nearest first, ties by frequency rank. ``<UNK>`` and the word
        itself are left out."""
        if word not in self.vocabulary:
            raise KeyError(f"{word!r} is not in the vocabulary ({len(self.vocabulary) - 1:,} words)")
        V = len(self.vocabulary)
        if codes is None:
            codes = self.word_hashes(k)
        elif codes.dtype != torch.uint8 or codes.shape != (V, code_bytes(self.num_hidden)):
            raise ValueError(
                f"codes must be uint8 (V, ceil(K/8)) = ({V}, {code_bytes(self.num_hidden)}), "
                f"got {codes.dtype} {tuple(codes.shape)}"
            )
        n = max(0, min(n, V - 2))
        query = codes[self.vocabulary.id(word)][None]
        dist, idx = kexue.ops.hamming_topk(query, codes, min(V, n + 2))
        out = [
            (self.vocabulary.words[i], d)
            for d, i in zip(dist[0].tolist(), idx[0].tolist(), strict=True)
            if i != 0 and self.vocabulary.words[i] != word
        ]
        return out[:n]
