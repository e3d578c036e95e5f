"""A PNG drawn from the rows alone: one panel per (family, mode), grouped bars of median time per
case and peer (log scale, whiskers at the 20% and 80% quantiles), and a black line per case at
the memory floor (the case's bytes at the in-place add bandwidth): no bar can go below it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402


def _panels(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        seen.setdefault((r["family"], r["mode"]), None)
    return list(seen)


def plot(rows: list[dict[str, Any]], floor: dict[str, Any], env: dict[str, Any], path: Path) -> Path:
    panels = _panels(rows)
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    colours = {p: plt.cm.tab10(i % 10) for i, p in enumerate(peers)}
    width = max(11, 1.2 * max((len({r["case"] for r in rows if r["family"] == f}) for f, _ in panels), default=0))
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(width, 4.2 * max(len(panels), 1)), squeeze=False)
    for ax, (family, mode) in zip(axes[:, 0], panels, strict=False):
        panel = [r for r in rows if r["family"] == family and r["mode"] == mode]
        cases = list(dict.fromkeys(r["case"] for r in panel))
        width = 0.8 / len(peers)
        for j, peer in enumerate(peers):
            xs, ys, lo, hi = [], [], [], []
            for i, case in enumerate(cases):
                row = next((r for r in panel if r["case"] == case and r["peer"] == peer), None)
                if row is None or row["median_s"] is None:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(row["median_s"] * 1e3)
                lo.append((row["median_s"] - row["q20_s"]) * 1e3)
                hi.append((row["q80_s"] - row["median_s"]) * 1e3)
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], color=colours[peer], label=peer, capsize=2)
        for i, case in enumerate(cases):
            floor_ms = next(r["bytes"] for r in panel if r["case"] == case) / (floor["gbps"] * 1e9) * 1e3
            ax.hlines(
                floor_ms, i - 0.45, i + 0.45, colors="black", linewidth=1.5, label="memory floor" if i == 0 else None
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=8)  # long case names
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{family}, {mode}")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(
        f"{env['device']}, {env['threads']} threads, torch {env['torch']}, kexue {env['kexue']}, "
        f"{env['date']}; floor {floor['gbps']:.3g} GB/s",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
