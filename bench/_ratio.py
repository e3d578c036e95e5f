"""Ratios and durations as people read them: always "kexue N x faster" or "N x slower", never a
time ratio below 1 that the reader has to invert, and goals in the same words."""

from __future__ import annotations


def speed(factor: float) -> str:
    """``factor`` = the other's time / kexue's time: "2.30x faster" or "1.40x slower"."""
    if factor >= 1:
        return f"{factor:.2f}x faster"
    return f"{1 / factor:.2f}x slower"


def goal(factor: float) -> str:
    """A goal on ``factor`` (the other's time / kexue's time), which must be at least ``factor``."""
    if f"{factor:.3g}" == "1":
        return "at least as fast"
    if factor >= 1:
        return f"at least {factor:.3g}x faster"
    return f"at most {1 / factor:.3g}x slower"


def duration(seconds: float) -> str:
    """A run's length: "24 min 49 s", "1 h 03 min", "8.4 s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
