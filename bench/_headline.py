"""A family's key ratio with its goal, read from the rows of its headline case."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from bench._ratio import goal as goal_text
from bench._ratio import speed

SUBJECT = "kexue"
_GOALS = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Headline:
    """``time(numerator) / time(denominator)`` on the headline case in ``mode``, with a goal.

    Example: ``Headline("forward", "kexue", "softmax", "<=", 3.0)`` reads "kexue's forward takes
    at most 3x torch.softmax's time".
    """

    mode: str
    numerator: str
    denominator: str
    goal: str  # "<=" or ">="
    bound: float

    def __post_init__(self):
        if self.goal not in _GOALS:
            raise ValueError(f"goal must be one of {sorted(_GOALS)}, got {self.goal!r}")
        if SUBJECT not in (self.numerator, self.denominator):
            raise ValueError(
                f"a headline compares {SUBJECT!r} with a peer, got {self.numerator!r} / {self.denominator!r}"
            )
        if (self.goal == "<=") != (self.numerator == SUBJECT):
            raise ValueError(
                "a headline's goal bounds kexue's speed from below: 'kexue / peer <= b' or 'peer / kexue >= b'"
            )

    @property
    def peer(self) -> str:
        return self.denominator if self.numerator == SUBJECT else self.numerator

    def factor(self, value: float) -> float:
        """The time ratio ``value`` as peer time / kexue time (above 1: kexue is faster)."""
        return 1 / value if self.numerator == SUBJECT else value

    @property
    def goal_factor(self) -> float:
        """The goal as the least peer time / kexue time."""
        return self.factor(self.bound)

    def evaluate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """A record with ``value`` (None when not measurable), ``met`` and a one-line ``text``."""
        label = f"kexue vs {self.peer}"
        goal = f"goal: {goal_text(self.goal_factor)}"
        record: dict[str, Any] = {
            "mode": self.mode,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "peer": self.peer,
            "goal": self.goal,
            "bound": self.bound,
            "goal_factor": self.goal_factor,
            "case": None,
            "value": None,
            "factor": None,
            "met": None,
            "reason": None,
        }
        case_rows = [r for r in rows if r["headline"] and r["mode"] == self.mode]
        if not case_rows:
            record["text"] = f"{label} ({self.mode}): not measured, no headline case was run ({goal})"
            return record
        record["case"] = case = case_rows[0]["case"]
        where = f"{case} {self.mode}"
        times = {}
        for name in (self.numerator, self.denominator):
            row = next((r for r in case_rows if r["peer"] == name), None)
            if row is None or row["median_s"] is None:
                record["reason"] = "not in this case" if row is None else f"{row['status']}: {row['reason']}"
                status = "not in this case" if row is None else f"{row['status']} (see above)"
                record["text"] = f"{label} on {where}: n/a, {name} {status} ({goal})"
                return record
            times[name] = row["median_s"]
        value = times[self.numerator] / times[self.denominator]
        met = _GOALS[self.goal](value, self.bound)
        record.update(value=value, factor=self.factor(value), met=met)
        record["text"] = f"{label} on {where}: {speed(self.factor(value))} ({goal}: {'met' if met else 'NOT MET'})"
        return record
