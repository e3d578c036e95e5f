"""kexue benchmarks: one module per op family plus a runner (``python -m bench``).

A family module ``bench/<family>.py`` (named like the op family everywhere else) defines

    cases(device: torch.device, quick: bool) -> list[bench.Case]

and may define ``HEADLINES: list[bench.Headline]``, the ratios that matter most for the family,
printed at the end of its section. Each :class:`Case` is one shape, dtype and mode, with the peers
to time against each other in the same process; the first peer named ``Case.subject`` is kexue.
Modules whose name starts with ``_`` (the harness, and parts of a family such as its extra
cases) and ``run`` are not families.
"""

from bench._case import Case, Headline, Peer, Skipped, Unavailable

__all__ = ["Case", "Headline", "Peer", "Skipped", "Unavailable"]
