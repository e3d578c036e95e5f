"""The worked run of examples/worked_run.py, shortened: both setups train, evaluate at 4x length, and report."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")  # the optional extra; make test installs it
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "worked_run.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("worked_run", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_worked_run_trains_both_setups_and_evaluates_at_4x(tmp_path):
    example = _load_example()
    results = example.main(
        ["--runs", "stock", "kexue", "--steps", "60", "--warmup", "10", "--eval-windows", "8", "--out", str(tmp_path)]
    )
    saved = json.loads((tmp_path / "worked_run.json").read_text())
    assert saved["runs"].keys() == {"stock", "kexue"} == results["runs"].keys()
    assert (tmp_path / "worked_run.png").stat().st_size > 0
    table = (tmp_path / "worked_run.md").read_text()
    assert "| kexue | tiger | logn |" in table and "ppl @ 512" in table
    for name, run in saved["runs"].items():
        losses = run["losses"]
        assert len(losses) == 60
        # Byte-level: a uniform guess costs ln 256 = 5.55 nats; both setups must learn well below it.
        assert sum(losses[-10:]) / 10 < min(losses[:3]) - 1.0, (name, losses[:3], losses[-10:])
        assert set(run["perplexity"]) == {"128", "512", "512, positions >= 128"}
        for length, ppl in run["perplexity"].items():
            assert math.isfinite(ppl) and 1 < ppl < 256, (name, length, ppl)
    assert saved["runs"]["kexue"]["optimizer"] == "tiger" and saved["runs"]["kexue"]["attention"] == "logn"
    assert saved["runs"]["stock"]["optimizer"] == "adamw" and saved["runs"]["stock"]["attention"] == "sdpa"
