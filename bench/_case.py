"""What a family hands the runner: cases, each with the peers to time against each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench._headline import Headline

Thunk = Callable[[], Any]

__all__ = ["Case", "Headline", "Peer", "Skipped", "Thunk", "Unavailable"]


class Unavailable(Exception):
    """Raised by :attr:`Peer.build` when the peer cannot run here; the message says why."""

    status = "unavailable"


class Skipped(Unavailable):
    """Raised by :attr:`Peer.build` when the peer could run but is left out on purpose (e.g. --quick)."""

    status = "skipped"


@dataclass(frozen=True)
class Peer:
    """One implementation to time.

    ``build(inputs)`` receives the case's inputs and returns the zero-argument callable to time
    (one complete call of the mode: forward, or forward and backward), or raises
    :class:`Unavailable`. Building is separate from calling so that per-peer preparation
    (a backend check, wrapping in ``torch.compile``) stays out of the timings.
    """

    name: str
    build: Callable[[dict[str, Any]], Thunk]


@dataclass(frozen=True)
class Case:
    """One shape, dtype and mode of an op family, and its peers.

    ``setup()`` makes the inputs once, shared by every peer and freed after the case, so that only
    one case's tensors are alive at a time. ``bytes`` is the traffic the op cannot avoid (read the
    inputs once, write the outputs once), the basis of the bandwidth columns; it is the same for
    every peer, whatever each one actually moves.
    """

    name: str  # shape and dtype, e.g. "4096x4096 fp32"
    mode: str  # "forward" or "full" (forward and backward)
    bytes: int
    setup: Callable[[], dict[str, Any]]
    peers: list[Peer]
    subject: str = "kexue"  # the peer the others are compared with
    headline: bool = False  # the case that the family's HEADLINES are read from
    params: dict[str, Any] = field(default_factory=dict)  # recorded in the rows (shape, dtype, ...)
