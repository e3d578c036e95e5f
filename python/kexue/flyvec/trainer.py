"""Training a FlyVec model: epochs of minibatch BioHash steps, checkpointed after every epoch.

Per epoch e of E: the learning rate is ``lr * (1 - e/E)`` (and the anti-Hebbian weight follows
FlyVec's tanh ramp, :func:`kexue.ops.biohash_schedule`); the windows are visited in a random order
drawn from ``seed`` and e, so a resumed run repeats exactly what an uninterrupted one does. After
each epoch the model is written atomically to ``DIR/model.pt`` (:mod:`kexue.flyvec.storage`); a
rerun of :func:`train` with the same folder resumes after the last completed epoch, and a rerun
with more epochs trains a finished model further (the remaining epochs follow the schedule of
the new total, so the result differs from a run planned that long from the start).

FlyVec's defaults (:data:`PRESETS` ``"flyvec"``) are sized for billions of windows; ``"small"``
is the recipe measured on a corpus of a few hundred thousand windows (see :data:`PRESETS`).
After every epoch one line reports the energy of the epoch's windows, how far the synapses moved
and the busiest unit's share of the windows (:class:`EpochStats`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

import kexue.ops
from kexue.flyvec import distributed, storage
from kexue.flyvec.model import DEFAULT_HASH_LENGTH, FlyVec
from kexue.flyvec.tokenize import read_sentences
from kexue.flyvec.vocabulary import Vocabulary, build_vocabulary
from kexue.flyvec.windows import context_windows, target_ids


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are FlyVec's (flyvec/train_flyvec.py, spec §1.3)."""

    hidden: int = 400  # K, the number of Kenyon cells
    window: int = 11  # tokens per window: 5 left context, the target, 5 right context
    epochs: int = 15
    batch_size: int = 10000
    lr: float = 0.002  # initial learning rate: the largest change of a step
    delta: float = 0.0  # anti-Hebbian weight (0: off, FlyVec's default)
    rank: int = 2  # the unit pushed away when delta > 0
    sigma: float = 0.02  # initial synapses ~ N(0, sigma^2)
    min_count: int = 5
    max_vocab: int | None = 20000
    seed: int = 0
    hash_length: int = DEFAULT_HASH_LENGTH  # k of the model's queries
    # words masked out of training: no context weight, and their own windows are dropped
    stop_words: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop_words, str) or not all(isinstance(w, str) for w in self.stop_words):
            raise TypeError(f"stop_words must be a sequence of str, got {self.stop_words!r}")
        object.__setattr__(self, "stop_words", tuple(sorted(set(self.stop_words))))
        for name in ("hidden", "window", "epochs", "batch_size", "rank", "min_count", "hash_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.hash_length > self.hidden:
            raise ValueError(f"hash_length must be at most hidden = {self.hidden}, got {self.hash_length}")
        if self.rank > self.hidden:
            raise ValueError(f"rank must be at most hidden = {self.hidden}, got {self.rank}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a positive finite float, got {self.lr!r}")
        if not (isinstance(self.delta, (int, float)) and abs(self.delta) < float("inf")):
            raise ValueError(f"delta must be a finite float, got {self.delta!r}")


# The "small" recipe, measured on the Wikipedia extract in gensim's test data (461k tokens, 245k
# windows; tests/biohash/test_eval.py): FlyVec's batch of 10,000 at lr 0.002 makes 25 steps an
# epoch that leave the synapses at their random init; 1,000 windows a batch at lr 0.1 makes 245
# steps that bring every unit to unit norm. Stop words stay in: masking them (stop_words=) spreads
# the windows over more units but did not raise the word-similarity scores (docs/flyvec.md).
SMALL_BATCH, SMALL_LR, SMALL_EPOCHS = 1000, 0.1, 15

PRESETS: dict[str, Callable[[], dict]] = {
    "flyvec": dict,
    "small": lambda: {"batch_size": SMALL_BATCH, "lr": SMALL_LR, "epochs": SMALL_EPOCHS},
}


def preset(name: str, **overrides) -> TrainConfig:
    """``TrainConfig`` of a named preset (``"flyvec"``: FlyVec's defaults, ``"small"``: a corpus of
    up to a few million windows), with ``overrides`` on top."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return TrainConfig(**{**PRESETS[name](), **overrides})


# A model whose target half still correlates this much with its random init has barely trained.
# FlyVec's defaults (batch 10,000, lr 0.002) are sized for billions of windows: on gensim's
# Wikipedia extract (245k windows) lr 0.01 at batch 1,000 left a correlation of 0.84 after 15
# epochs, and lr 0.1 left 0.003.
UNTRAINED_CORRELATION = 0.9


def _as_saved(value):
    """A setting as the model file holds it (tuples come back as lists)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def init_correlation(synapses: torch.Tensor, config: TrainConfig) -> float:
    """Pearson correlation of the target half of ``synapses (K, 2V)`` with the same half of the
    random init that ``config.seed`` gives (1: not moved at all)."""
    V = synapses.shape[1] // 2
    g = torch.Generator().manual_seed(config.seed)
    init = kexue.ops.new_synapses(config.hidden, 2 * V, std=config.sigma, generator=g)
    a, b = synapses[:, V:].double().flatten(), init[:, V:].double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-300))


# What must match for a checkpoint to be resumed with a given config (the rest may change; epochs
# may grow, to train a finished model further).
_RESUME_KEYS = ("hidden", "window", "batch_size", "lr", "delta", "rank", "seed", "min_count", "max_vocab", "stop_words")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: train without a bar
        return None
    return tqdm(total=total, desc=desc, unit="win", unit_scale=True, leave=True, file=sys.stderr)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did: ``energy`` (spec §1.2, per window, at each batch's start; lower is
    better), ``moved`` (``||W_after - W_before|| / ||W_before||`` over the epoch) and
    ``busiest_share`` (the fraction of the epoch's windows won by the unit that won most)."""

    energy: float
    moved: float
    busiest_share: float

    def line(self, epoch: int, epochs: int) -> str:
        return (
            f"epoch {epoch + 1}/{epochs}: energy {self.energy:.4g} per window, synapses moved "
            f"{self.moved:.3g} (relative), busiest unit {self.busiest_share:.1%} of the windows"
        )


def epoch_order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The order windows are visited in during ``epoch``: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=g)


def run_epoch(
    windows: torch.Tensor, invf: torch.Tensor, synapses: torch.Tensor, epoch: int, config: TrainConfig, bar=None
) -> EpochStats:
    """One epoch in place on ``synapses``; returns what it did (:class:`EpochStats`)."""
    V = invf.shape[0]
    lr, delta = kexue.ops.biohash_schedule(epoch, config.epochs, config.lr, config.delta)
    energy, count = 0.0, 0
    wins = torch.zeros(synapses.shape[0], dtype=torch.int64)
    before = synapses.clone()
    parallel = distributed.world()[1] > 1
    for batch in epoch_order(windows.shape[0], config.seed, epoch).split(config.batch_size):
        x = windows[distributed.shard(batch) if parallel else batch].long()
        w = invf[x.remainder(V)]
        norms = synapses.norm(dim=1)  # the energy divides by the winner's norm before the step
        if parallel:
            winners, s_win = distributed.data_parallel_update(x, w, synapses, lr, delta, config.rank)
        else:
            winners, s_win = kexue.ops.biohash_update(x, None, w, synapses, lr, delta=delta, rank=config.rank)
        energy -= float((s_win.double() / norms[winners].double().clamp_min(1e-30)).sum())
        count += s_win.numel()
        wins += torch.bincount(winners.cpu(), minlength=wins.shape[0])
        if bar is not None:
            bar.update(batch.shape[0])
    moved = float((synapses - before).norm() / before.norm().clamp_min(1e-30))
    return EpochStats(energy / max(count, 1), moved, float(wins.max()) / max(int(wins.sum()), 1))


def prepare(corpus, vocabulary: Vocabulary | None, config: TrainConfig) -> tuple[Vocabulary, torch.Tensor]:
    """Tokenize ``corpus``, build (or reuse) the vocabulary, and make the windows."""
    sentences = list(read_sentences(corpus))
    if not sentences:
        raise ValueError("the corpus is empty: it has no tokens")
    if vocabulary is None:
        vocabulary = build_vocabulary(sentences, config.min_count, config.max_vocab)
    windows = context_windows((vocabulary.encode(s) for s in sentences), len(vocabulary), config.window)
    if windows.shape[0] == 0:
        raise ValueError(f"the corpus has no sentence of at least window = {config.window} tokens")
    stop = stop_ids(vocabulary, config)
    if stop.numel():  # a stop word's own windows carry nothing to learn
        windows = windows[~torch.isin(target_ids(windows, len(vocabulary)), stop)]
        if windows.shape[0] == 0:
            raise ValueError("every window's target is a stop word: nothing left to train on")
    return vocabulary, windows


def stop_ids(vocabulary: Vocabulary, config: TrainConfig) -> torch.Tensor:
    """The vocabulary ids of ``config.stop_words`` (int64)."""
    return torch.tensor(sorted(vocabulary.id(w) for w in config.stop_words if w in vocabulary), dtype=torch.int64)


def input_weights(vocabulary: Vocabulary, config: TrainConfig) -> torch.Tensor:
    """FlyVec's 1/frequency input scaling per id, 0 for stop words (masked out of every context)."""
    invf = vocabulary.inverse_frequency().float()
    invf[stop_ids(vocabulary, config)] = 0.0
    return invf


def train(
    corpus: str | os.PathLike | Iterable[str],
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    on_epoch_end: Callable[[int, FlyVec], None] | None = None,
) -> FlyVec:
    """Train FlyVec on ``corpus`` (a text file, one sentence a line, or an iterable of lines),
    writing ``out/model.pt`` after every epoch; resumes from it when it exists.

    ``on_epoch_end(epoch, model)`` is called after each epoch's checkpoint is written.
    Inside an initialized ``torch.distributed`` process group every process trains on its share
    of each minibatch (:mod:`kexue.flyvec.distributed`) and process 0 writes the checkpoints.
    """
    config = config or TrainConfig()
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out must be a folder (model.pt is written into it), but {out!r} is a file")
    path = os.path.join(out, storage.MODEL_FILE)
    storage.remove_stale_temporaries(out)
    start, vocabulary, synapses = 0, None, None
    if os.path.exists(path):
        state = storage.load_state(path)
        saved = state["config"]
        defaults = TrainConfig()
        changed = [
            k for k in _RESUME_KEYS if _as_saved(saved.get(k, getattr(defaults, k))) != _as_saved(getattr(config, k))
        ]
        if changed:
            raise ValueError(
                f"{path!r} was trained with other settings ({', '.join(changed)}); "
                "use another --out folder, or the same settings to resume (more epochs "
                "train it further)"
            )
        start = int(state["epoch"])
        vocabulary = Vocabulary(list(state["words"]), state["counts"])
        synapses = state["synapses_t"].t()
    vocabulary, windows = prepare(corpus, vocabulary, config)
    if synapses is None:
        g = torch.Generator().manual_seed(config.seed)
        synapses = kexue.ops.new_synapses(config.hidden, 2 * len(vocabulary), std=config.sigma, generator=g)
    cfg = dataclasses.asdict(config)
    cfg["stop_words"] = list(config.stop_words)
    model = FlyVec(synapses, vocabulary, config.hash_length, cfg)
    invf = input_weights(vocabulary, config)
    show = progress and distributed.world()[0] == 0
    if show and start >= config.epochs:
        print(
            f"{path} is already trained for {start} epochs (asked: {config.epochs}); pass a larger "
            "--epochs to train it further",
            file=sys.stderr,
        )
    for epoch in range(start, config.epochs):
        bar = _progress(windows.shape[0], f"epoch {epoch + 1}/{config.epochs}", show)
        try:
            stats = run_epoch(windows, invf, synapses, epoch, config, bar)
        finally:
            if bar is not None:
                bar.close()
        if show:
            print(stats.line(epoch, config.epochs), file=sys.stderr, flush=True)
        if distributed.world()[0] == 0:  # one writer; the others wait until the file is complete
            model.save(path, epoch=epoch + 1, config=cfg)
        distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    model._static.clear()
    corr = init_correlation(synapses, config)
    if corr > UNTRAINED_CORRELATION:
        warnings.warn(
            f"after {config.epochs} epochs of {windows.shape[0]} windows the target half of the synapses "
            f"still correlates {corr:.2f} with its random init: the model has barely trained. FlyVec's "
            f"defaults are sized for billions of windows; for a corpus this size use the 'small' preset "
            f"(--preset small: batch_size {SMALL_BATCH}, lr {SMALL_LR}) or make more "
            f"steps (now {-(-windows.shape[0] // config.batch_size)} batches an epoch at lr {config.lr})",
            UserWarning,
            stacklevel=2,
        )
    return model
