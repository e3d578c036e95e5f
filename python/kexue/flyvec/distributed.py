"""Data-parallel FlyVec training across processes with ``torch.distributed`` (gloo on CPU).

Every process holds the whole synapse matrix and visits the same minibatches in the same order
(:func:`kexue.flyvec.trainer.epoch_order` depends only on the seed and the epoch); process r takes
rows ``r, r + P, r + 2P, ...`` of each minibatch, makes the step on its shard, and the changes are
all-reduced and averaged, so every process ends each step with the same synapses. Each shard's
step is normalized on its own (its largest change is lr), so P processes make the same size of
step as one process does on the whole minibatch, but not bit for bit the same step.

Start the processes as usual (``torchrun``, or ``torch.multiprocessing`` with
``init_process_group("gloo", ...)``) and call :func:`kexue.flyvec.train` in each; only process 0
writes checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import kexue.ops


def world() -> tuple[int, int]:
    """``(rank, size)`` of the process group, ``(0, 1)`` when none is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This process's rows of a minibatch (every P-th, starting at its rank)."""
    rank, size = world()
    return batch[rank::size]


def data_parallel_update(
    x: torch.Tensor, weights: torch.Tensor, synapses: torch.Tensor, lr: float, delta: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on this process's shard, then the average of every process's change, in place.
    Returns the shard's winners and scaled winner activations."""
    _, size = world()
    before = synapses.clone()
    winners, s_win = kexue.ops.biohash_update(x, None, weights, synapses, lr, delta=delta, rank=rank)
    if size > 1:
        change = synapses - before
        dist.all_reduce(change)
        synapses.copy_(before + change / size)
    return winners, s_win


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
