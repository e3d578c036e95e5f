"""Chooses one of a few statically checked tile candidates per problem key by timing them once.

The tile tables of the launchers give one default per (target family, head dim, dot mode); which
of two or three clean tiles runs fastest also depends on how many programs the grid has and how
long each program's key loop is, which the tables cannot know. A launcher hands :func:`pick` its
key (the family, head dim, dtype, switches and :func:`length_bucket` of the problem), its
candidates (the default first; every candidate is listed in the kernel's ``AOT_CONFIGS``, so
tests/gpu_compile.py has compiled each one for registers, stack, spills and layouts) and a
``run(candidate)`` that launches the kernel with that candidate.

The first call for a key on a GPU times every candidate (one launch that compiles and warms it,
then :data:`TIMED_LAUNCHES` launches between CUDA events) and keeps the fastest for the rest of
the process; later calls look it up. Each candidate writes its whole output and reads no output
of another, so a repeated launch is harmless; the winner is launched last, so the first call
returns exactly what later calls for the key return.

No timing, the first candidate instead, and nothing cached:

* ``KEXUE_AUTOTUNE=0`` in the environment (read at each call);
* tensors off CUDA (the interpreter runs on CPU tensors);
* during CUDA-graph capture or torch.compile tracing: timing synchronises the device, and a
  captured graph would replay every candidate. A later eager call tunes the key;
* while ``torch.cuda.set_sync_debug_mode`` warns or raises on synchronising calls: a user who
  asked to hear of every host synchronisation gets none from the tuner.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")

# Bounds of the length buckets (the longest query or key length): the best tile moves with the
# number of programs (short sequences want fewer rows a program) and with the key loop's length.
LENGTH_BUCKETS = (512, 2048, 8192)
TIMED_LAUNCHES = 3

_chosen: dict[Hashable, int] = {}  # key -> index of the fastest candidate


def length_bucket(length: int) -> int:
    """The smallest bound in :data:`LENGTH_BUCKETS` that ``length`` does not exceed, or one bucket
    (four times the last bound) for every longer length."""
    for bound in LENGTH_BUCKETS:
        if length <= bound:
            return bound
    return LENGTH_BUCKETS[-1] * 4


def enabled() -> bool:
    return os.environ.get("KEXUE_AUTOTUNE", "1") != "0"


def may_time(device: torch.device) -> bool:
    """Whether a call on ``device`` may time candidates now (see the module docstring)."""
    if device.type != "cuda" or not enabled() or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing() and torch.cuda.get_sync_debug_mode() == 0


def cuda_time(run: Callable[[], None]) -> float:
    """Milliseconds of the fastest of :data:`TIMED_LAUNCHES` launches of ``run`` after a warm-up."""
    run()  # compiles the candidate on its first use
    best = float("inf")
    for _ in range(TIMED_LAUNCHES):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def pick(
    key: Hashable,
    candidates: Sequence[T],
    run: Callable[[T], None],
    device: torch.device,
    timer: Callable[[Callable[[], None]], float] | None = None,
) -> T:
    """Runs the chosen candidate for ``key`` (timing them all on the key's first eligible call)
    and returns it. ``timer`` (default :func:`cuda_time`) returns a thunk's time in ms."""
    if len(candidates) == 1 or not may_time(device):
        choice = _chosen.get(key, 0) if enabled() else 0
        run(candidates[choice])
        return candidates[choice]
    if key not in _chosen:
        timer = timer or cuda_time
        times = [timer(lambda c=c: run(c)) for c in candidates]
        _chosen[key] = min(range(len(candidates)), key=times.__getitem__)
    choice = candidates[_chosen[key]]
    run(choice)
    return choice


def chosen() -> dict[Hashable, int]:
    """A copy of the choices made so far (key -> candidate index), e.g. to log them."""
    return dict(_chosen)


def forget() -> None:
    """Drops every choice, so the next call for each key times its candidates again."""
    _chosen.clear()
