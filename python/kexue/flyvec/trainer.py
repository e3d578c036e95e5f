"""Training a FlyVec model: epochs of minibatch BioHash steps, checkpointed after every epoch.

Per epoch e of E: the learning rate is ``lr * (1 - e/E)`` (and the anti-Hebbian weight follows
FlyVec's tanh ramp, :func:`kexue.ops.biohash_schedule`); the windows are visited in a random order
drawn from ``seed`` and e, so a resumed run repeats exactly what an uninterrupted one does. After
each epoch the model is written atomically to ``DIR/model.pt`` (:mod:`kexue.flyvec.storage`); a
rerun of :func:`train` with the same folder resumes after the last completed epoch.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

import kexue.ops
from kexue.flyvec import distributed, storage
from kexue.flyvec.model import DEFAULT_HASH_LENGTH, FlyVec
from kexue.flyvec.tokenize import read_sentences
from kexue.flyvec.vocabulary import Vocabulary, build_vocabulary
from kexue.flyvec.windows import context_windows


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

    def __post_init__(self):
        for name in ("hidden", "window", "epochs", "batch_size", "rank", "min_count", "hash_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.hash_length > self.hidden:
            raise ValueError(f"hash_length must be at most hidden = {self.hidden}, got {self.hash_length}")
        if self.rank > self.hidden:
            raise ValueError(f"rank must be at most hidden = {self.hidden}, got {self.rank}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


# A model whose target half still correlates this much with its random init has barely trained.
# FlyVec's defaults (batch 10,000, lr 0.002) are sized for billions of windows: on gensim's
# Wikipedia extract (245k windows) lr 0.01 at batch 1,000 left a correlation of 0.84 after 15
# epochs, and lr 0.1 left 0.003.
UNTRAINED_CORRELATION = 0.9


def init_correlation(synapses: torch.Tensor, config: TrainConfig) -> float:
    """Pearson correlation of the target half of ``synapses (K, 2V)`` with the same half of the
    random init that ``config.seed`` gives (1: not moved at all)."""
    V = synapses.shape[1] // 2
    g = torch.Generator().manual_seed(config.seed)
    init = kexue.ops.new_synapses(config.hidden, 2 * V, std=config.sigma, generator=g)
    a, b = synapses[:, V:].double().flatten(), init[:, V:].double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-300))


# What must match for a checkpoint to be resumed with a given config (the rest may change).
_RESUME_KEYS = ("hidden", "window", "epochs", "batch_size", "lr", "delta", "rank", "seed", "min_count", "max_vocab")


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: train without a bar
        return None
    return tqdm(total=total, desc=desc, unit="win", unit_scale=True, leave=False)


def epoch_order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The order windows are visited in during ``epoch``: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_windows, generator=g)


def run_epoch(windows: torch.Tensor, invf: torch.Tensor, synapses: torch.Tensor, epoch: int,
              config: TrainConfig, bar=None) -> float:
    """One epoch in place on ``synapses``; returns the mean scaled winner activation (a progress signal)."""
    V = invf.shape[0]
    lr, delta = kexue.ops.biohash_schedule(epoch, config.epochs, config.lr, config.delta)
    total, count = 0.0, 0
    parallel = distributed.world()[1] > 1
    for batch in epoch_order(windows.shape[0], config.seed, epoch).split(config.batch_size):
        x = windows[distributed.shard(batch) if parallel else batch].long()
        w = invf[x.remainder(V)]
        if parallel:
            s_win = distributed.data_parallel_update(x, w, synapses, lr, delta, config.rank)
        else:
            _, s_win = kexue.ops.biohash_update(x, None, w, synapses, lr, delta=delta, rank=config.rank)
        total += float(s_win.sum())
        count += s_win.numel()
        if bar is not None:
            bar.update(batch.shape[0])
    return total / max(count, 1)


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
    return vocabulary, windows


def train(corpus: str | os.PathLike | Iterable[str], out: str | os.PathLike, config: TrainConfig | None = None,
          *, progress: bool = True, on_epoch_end: Callable[[int, FlyVec], None] | None = None) -> FlyVec:
    """Train FlyVec on ``corpus`` (a text file, one sentence a line, or an iterable of lines),
    writing ``out/model.pt`` after every epoch; resumes from it when it exists.

    ``on_epoch_end(epoch, model)`` is called after each epoch's checkpoint is written.
    Inside an initialized ``torch.distributed`` process group every process trains on its share
    of each minibatch (:mod:`kexue.flyvec.distributed`) and process 0 writes the checkpoints.
    """
    config = config or TrainConfig()
    path = os.path.join(os.fspath(out), storage.MODEL_FILE)
    start, vocabulary, synapses = 0, None, None
    if os.path.exists(path):
        state = storage.load_state(path)
        saved = state["config"]
        changed = [k for k in _RESUME_KEYS if saved.get(k) != getattr(config, k)]
        if changed:
            raise ValueError(f"{path!r} was trained with other settings ({', '.join(changed)}); "
                             "use another --out folder or the same settings to resume")
        start = int(state["epoch"])
        vocabulary = Vocabulary(list(state["words"]), state["counts"])
        synapses = state["synapses_t"].t()
    vocabulary, windows = prepare(corpus, vocabulary, config)
    if synapses is None:
        g = torch.Generator().manual_seed(config.seed)
        synapses = kexue.ops.new_synapses(config.hidden, 2 * len(vocabulary), std=config.sigma, generator=g)
    model = FlyVec(synapses, vocabulary, config.hash_length)
    invf = vocabulary.inverse_frequency().float()
    cfg = dataclasses.asdict(config)
    for epoch in range(start, config.epochs):
        show = progress and distributed.world()[0] == 0
        bar = _progress(windows.shape[0], f"epoch {epoch + 1}/{config.epochs}", show)
        try:
            run_epoch(windows, invf, synapses, epoch, config, bar)
        finally:
            if bar is not None:
                bar.close()
        if distributed.world()[0] == 0:  # one writer; the others wait until the file is complete
            model.save(path, epoch=epoch + 1, config=cfg)
        distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
    model._static.clear()
    corr = init_correlation(synapses, config)
    if corr > UNTRAINED_CORRELATION:
        warnings.warn(f"after {config.epochs} epochs of {windows.shape[0]} windows the target half of the synapses "
                      f"still correlates {corr:.2f} with its random init: the model has barely trained. FlyVec's "
                      f"defaults are sized for billions of windows; on a corpus this size raise lr (now "
                      f"{config.lr}) or epochs, or lower batch_size (now {config.batch_size})", UserWarning,
                      stacklevel=2)
    return model
