"""A family's key ratio with its goal, read from the rows of its headline case."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

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

    def evaluate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """A record with ``value`` (None when not measurable), ``met`` and a one-line ``text``."""
        label = f"{self.numerator} / {self.denominator} time"
        goal = f"goal {self.goal} {self.bound:g}x"
        record: dict[str, Any] = {
            "mode": self.mode, "numerator": self.numerator, "denominator": self.denominator,
            "goal": self.goal, "bound": self.bound, "case": None, "value": None, "met": None, "reason": None,
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
        record.update(value=value, met=met)
        record["text"] = f"{label} on {where}: {value:.2f}x ({goal}: {'met' if met else 'NOT MET'})"
        return record
