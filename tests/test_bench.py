"""Smoke test of the benchmark harness: a --quick run in-process writes a complete JSON and a plot.

Times nothing worth reading; it checks that the runner, the entropy_norm family, the table, the
JSON schema and the plot hold together.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")  # the plot needs it; it is in the "bench" extra, not a dependency

from bench import run  # noqa: E402  (bench/ is importable because pytest puts the repo root on sys.path)

ROW_FIELDS = {
    "family",
    "case",
    "mode",
    "peer",
    "subject",
    "headline",
    "params",
    "bytes",
    "status",
    "reason",
    "median_s",
    "q20_s",
    "q80_s",
    "runs",
    "calls_per_run",
    "first_call_s",
    "peak_mem_bytes",
    "gbps",
    "floor_fraction",
    "subject_over_peer",
    "device",
    "torch",
    "triton",
    "kexue",
    "threads",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: with two, an OpenMP op on a machine busy with other jobs waits a scheduler tick
    # for its second thread at every call, and the smoke run takes several times as long.
    args = ["--quick", "--only", "entropy_norm", "--out", str(out), "--device", "cpu", "--threads", "1"]
    tracked = [run.README, *sorted(run.DOCS_PLOTS.glob("*.png"))]
    before = [f.read_bytes() for f in tracked]
    assert run.main(args) == 0
    # a run leaves the checkout as it was: README and docs/bench/ change only by --publish
    assert [f.read_bytes() for f in tracked] == before
    (json_path,) = out.glob("bench-*.json")
    return json.loads(json_path.read_text()), out


def test_json_has_run_record(quick_run):
    record, _ = quick_run
    assert record["quick"] is True and record["full"] is False
    assert set(record["load"]) >= {"ok", "load_average", "cpus"}
    for key in ("device", "torch", "triton", "kexue", "threads", "kexue_backends", "date"):
        assert key in record["env"], key
    assert record["env"]["threads"] == 1
    floor = record["floor"]
    assert floor["gbps"] > 0 and floor["bytes"] == 12 * floor["elements"]
    # the floor is the fastest sample (other jobs only slow samples down), not the median
    assert floor["best_s"] <= floor["q20_s"] <= floor["median_s"]
    assert floor["gbps"] == pytest.approx(floor["bytes"] / floor["best_s"] / 1e9)


def test_default_plan_runs_only_headline_cases(quick_run):
    record, _ = quick_run
    from bench import entropy_norm

    all_cases = entropy_norm.cases(__import__("torch").device("cpu"), True)
    assert any(not c.headline for c in all_cases)  # the family has more than the default plan runs
    assert record["rows"] and all(r["headline"] for r in record["rows"])


def test_rows_cover_every_peer_and_mode(quick_run):
    record, _ = quick_run
    rows = record["rows"]
    assert rows and all(ROW_FIELDS <= set(r) for r in rows)
    assert {r["mode"] for r in rows} == {"forward", "full"}
    assert {"kexue", "softmax", "reference", "reference-compiled"} <= {r["peer"] for r in rows}
    for r in rows:
        if r["status"] == "ok":
            assert r["q20_s"] <= r["median_s"] <= r["q80_s"]
            assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        else:  # a peer that was not timed says why
            assert r["status"] in {"unavailable", "skipped", "error"} and r["reason"]
    # The torch reference and softmax run everywhere, so at least they are timed.
    assert all(r["status"] == "ok" for r in rows if r["peer"] in {"softmax", "reference"})


def test_headlines_are_evaluated(quick_run):
    record, _ = quick_run
    headlines = record["headlines"]["entropy_norm"]
    assert len(headlines) == 2 and all(h["text"] for h in headlines)
    kexue_timed = any(r["peer"] == "kexue" and r["status"] == "ok" for r in record["rows"])
    assert all((h["value"] is not None) == kexue_timed for h in headlines)


def test_plot_written(quick_run):
    _, out = quick_run
    for name in ("bench.png", "bench-entropy_norm.png"):  # all families, then one per family
        png = out / name
        assert png.exists() and png.stat().st_size > 0, name


def test_ratios_read_one_way():
    from bench._ratio import duration, goal, speed
    from bench._table import fmt_ratio

    assert speed(2.3) == "2.30x faster" and speed(1 / 1.4) == "1.40x slower"
    assert fmt_ratio(0.5) == "2.00x faster" and fmt_ratio(2.0) == "2.00x slower"  # kexue time / peer time
    assert goal(1.3) == "at least 1.3x faster" and goal(1 / 3) == "at most 3x slower"
    assert goal(1.0) == "at least as fast"
    assert duration(1489) == "24 min 49 s" and duration(8.44) == "8.4 s" and duration(3720) == "1 h 02 min"


def test_headline_text_and_goal_from_kexue_side():
    from bench import Headline

    rows = [
        {"headline": True, "mode": "lion", "case": "c", "peer": p, "median_s": t, "status": "ok", "reason": None}
        for p, t in (("kexue", 0.044), ("adamw-fused", 0.064))
    ]
    h = Headline("lion", "kexue", "adamw-fused", "<=", 1 / 1.3).evaluate(rows)
    assert h["factor"] == pytest.approx(0.064 / 0.044) and h["goal_factor"] == pytest.approx(1.3)
    assert h["met"] and "kexue vs adamw-fused on c lion: 1.45x faster (goal: at least 1.3x faster: met)" == h["text"]
    with pytest.raises(ValueError, match="compares 'kexue'"):
        Headline("lion", "a", "b", ">=", 2.0)
    with pytest.raises(ValueError, match="from below"):
        Headline("lion", "kexue", "b", ">=", 2.0)


def test_table_has_no_peak_memory_column_on_cpu(quick_run):
    from bench._table import format_table

    record, _ = quick_run
    assert all(r["peak_mem_bytes"] is None for r in record["rows"])
    header = format_table(record["rows"]).splitlines()[0]
    assert "peak mem" not in header and "kexue vs peer" in header


def test_readme_table_is_rewritten_between_markers(tmp_path):
    from bench import _readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{_readme.START}\nold\n| other | c | r | 1x | <= 1x | yes |\n{_readme.END}\ntail\n")
    headline = {
        "mode": "forward",
        "numerator": "kexue",
        "denominator": "softmax",
        "peer": "softmax",
        "goal": "<=",
        "bound": 3.0,
        "goal_factor": 1 / 3,
        "case": "4096x4096 fp32",
        "value": 2.5,
        "factor": 0.4,
        "met": True,
        "reason": None,
    }
    rows = [
        {"family": "entropy_norm", "case": "4096x4096 fp32", "mode": "forward", "peer": p, "median_s": t}
        for p, t in (("kexue", 0.05), ("softmax", 0.02))
    ]
    env = {"device": "cpu", "threads": 2, "torch": "2", "kexue": "0", "date": "today"}
    assert _readme.update(readme, {"entropy_norm": [headline]}, rows, env, elapsed_s=1489.0)
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith("tail\n") and "old" not in text
    assert (
        "| entropy_norm | 4096x4096 fp32 | softmax (forward) | 2.50x slower (kexue 50 ms, softmax 20 ms) "
        "| at most 3x slower | yes |"
    ) in text
    assert "The run took 24 min 49 s." in text
    assert "| other | c | r | 1x | <= 1x | yes |" in text  # a family not run this time keeps its line
    readme.write_text("no markers")
    assert not _readme.update(readme, {}, rows, env)


def test_a_run_writes_only_into_its_results_folder(quick_run):
    _, out = quick_run
    assert {p.name for p in out.iterdir()} == {
        next(out.glob("bench-*.json")).name,
        "bench.png",
        "bench-entropy_norm.png",
    }


def _record(quick_run, tmp_path, **changes):
    """A copy of the smoke run's record in a folder of its own, with ``changes`` applied."""
    record, _ = quick_run
    record = {**json.loads(json.dumps(record)), **changes}
    folder = tmp_path / "results"
    folder.mkdir(exist_ok=True)
    path = folder / "bench-20990101-000000.json"
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def fake_readme(tmp_path, monkeypatch):
    from bench import _readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{_readme.START}\n{_readme.END}\n")
    monkeypatch.setattr(run, "README", readme)
    monkeypatch.setattr(run, "DOCS_PLOTS", tmp_path / "docs")
    return readme


def test_publish_rewrites_the_readme_from_the_newest_record(quick_run, tmp_path, fake_readme):
    path = _record(quick_run, tmp_path, quick=False, load={"ok": True, "text": "free"})
    assert run.main(["--publish", "--out", str(path.parent)]) == 0
    assert (path.parent / "bench-entropy_norm.png").stat().st_size > 0
    assert (tmp_path / "docs" / "entropy_norm.png").stat().st_size > 0
    table = fake_readme.read_text()
    assert "| entropy_norm | " in table and "torch " in table  # the rows, and the machine line above them


@pytest.mark.parametrize(
    "changes",
    [
        {"quick": False, "load": {"ok": False, "text": "load average 3.1 on 2 CPUs"}},
        {"quick": True, "load": {"ok": True, "text": "free"}},
    ],
)
def test_publish_refuses_a_busy_or_quick_run(quick_run, tmp_path, fake_readme, capsys, changes):
    before = fake_readme.read_text()
    path = _record(quick_run, tmp_path, **changes)
    assert run.main(["--publish", str(path), "--out", str(tmp_path / "plots")]) == 1
    assert "not published" in capsys.readouterr().err
    assert fake_readme.read_text() == before and not (tmp_path / "docs").exists()


def test_old_no_readme_flag_is_still_accepted():
    assert run.parse_args(["--no-readme", "--quick"]).quick  # runs never write the README now


def test_publish_without_a_record_says_so(tmp_path, capsys):
    assert run.main(["--publish", "--out", str(tmp_path)]) == 2
    assert "run `make bench` first" in capsys.readouterr().err
