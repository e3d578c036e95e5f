"""The GPU benchmark's code paths, on a machine without a GPU (bench/gpu/)."""

from __future__ import annotations

import json

import pytest
import torch

from bench._case import Case, Headline, Peer, Unavailable
from bench._timing import Timing
from bench.gpu import FAMILIES
from bench.gpu import __main__ as runner
from bench.gpu._report import evaluate_goals, format_family, make_rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_the_default_plan_is_a_clear_skip(tmp_path, capsys):
    assert runner.main(["--out", str(tmp_path)]) == 0
    assert "no GPU" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu-bench.json").read_text()) == {"status": "skipped", "reason": "no CUDA device"}


def test_every_family_defines_cases_for_every_plan():
    import importlib

    for name in FAMILIES:
        module = importlib.import_module(f"bench.gpu.{name}")
        for plan in runner.PLANS:
            cases = module.cases(torch.device("cpu"), plan)
            assert cases and all(isinstance(c, Case) and c.peers for c in cases), (name, plan)
            assert any(c.headline for c in cases), (name, plan)


def _case(**params) -> Case:
    return Case(
        name="c",
        mode="forward",
        bytes=4_000_000,
        setup=dict,
        peers=[Peer("kexue", None), Peer("peer", None), Peer("absent", None)],
        headline=True,
        params=params,
    )


def test_rows_speed_in_one_direction_and_goals():
    case = _case(flops=2e9, floor_goal=0.5)
    results = {
        "kexue": Timing([1e-3, 1e-3, 1e-3], 1, 0.0),
        "peer": Timing([3e-3] * 3, 1, 0.0),
        "absent": Unavailable("not installed"),
    }
    rows = make_rows("fam", case, results, {"kexue": 2**20}, {"gbps": 16.0}, {"device": "X"})
    kexue, peer, absent = rows
    assert kexue["tflops"] == pytest.approx(2.0) and kexue["gbps"] == pytest.approx(4.0)
    assert kexue["floor_fraction"] == pytest.approx(0.25)
    assert peer["subject_speedup"] == pytest.approx(3.0) and kexue["subject_speedup"] is None
    assert absent["status"] == "unavailable" and "not installed" in absent["reason"]
    goals = evaluate_goals(rows, [Headline("forward", "kexue", "peer", "<=", 0.5)])
    assert goals[0]["met"] is True and goals[1]["met"] is False  # 1/3 <= 0.5; 25% < 50% of the floor
    table = format_family("fam", rows, goals)
    assert "kexue 3.00x faster" in table and "25%" in table and "NOT MET" in table


def test_smoke_plan_runs_a_family_end_to_end(tmp_path):
    assert runner.main(["--plan", "smoke", "--only", "entropy_norm", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu-bench.json").read_text())
    rows = record["families"]["entropy_norm"]["rows"]
    softmax = next(r for r in rows if r["peer"] == "softmax")
    assert record["status"] == "done" and softmax["status"] == "ok" and softmax["median_s"] > 0


@pytest.mark.slow
def test_smoke_plan_runs_every_family(tmp_path):
    assert runner.main(["--plan", "smoke", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert set(record["families"]) == set(FAMILIES)
    for name, family in record["families"].items():
        errors = [f"{r['peer']}: {r['reason']}" for r in family["rows"] if r["status"] == "error"]
        assert not errors, (name, errors)
