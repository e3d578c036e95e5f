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
    "family", "case", "mode", "peer", "subject", "headline", "params", "bytes", "status", "reason",
    "median_s", "q20_s", "q80_s", "runs", "calls_per_run", "first_call_s", "peak_mem_bytes", "gbps",
    "floor_fraction", "subject_over_peer", "device", "torch", "triton", "kexue", "threads",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # One thread: with two, an OpenMP op on a machine busy with other jobs waits a scheduler tick
    # for its second thread at every call, and the smoke run takes several times as long.
    args = ["--quick", "--only", "entropy_norm", "--out", str(out), "--device", "cpu", "--threads", "1"]
    assert run.main(args) == 0
    (json_path,) = out.glob("bench-*.json")
    return json.loads(json_path.read_text()), out


def test_json_has_run_record(quick_run):
    record, _ = quick_run
    assert record["quick"] is True
    for key in ("device", "torch", "triton", "kexue", "threads", "kexue_backends", "date"):
        assert key in record["env"], key
    assert record["env"]["threads"] == 1
    assert record["floor"]["gbps"] > 0
    assert record["floor"]["bytes"] == 12 * record["floor"]["elements"]


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


def test_readme_table_is_rewritten_between_markers(tmp_path):
    from bench import _readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{_readme.START}\nold\n| other | c | r | 1x | <= 1x | yes |\n{_readme.END}\ntail\n")
    headline = {"mode": "forward", "numerator": "kexue", "denominator": "softmax", "goal": "<=", "bound": 3.0,
                "case": "4096x4096 fp32", "value": 2.5, "met": True, "reason": None}
    rows = [{"family": "entropy_norm", "case": "4096x4096 fp32", "mode": "forward", "peer": p, "median_s": t}
            for p, t in (("kexue", 0.05), ("softmax", 0.02))]
    env = {"device": "cpu", "threads": 2, "torch": "2", "kexue": "0", "date": "today"}
    assert _readme.update(readme, {"entropy_norm": [headline]}, rows, env)
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith("tail\n") and "old" not in text
    assert "| entropy_norm | 4096x4096 fp32 | kexue / softmax time (forward) | 2.50x" in text
    assert "| other | c | r | 1x | <= 1x | yes |" in text  # a family not run this time keeps its line
    readme.write_text("no markers")
    assert not _readme.update(readme, {}, rows, env)


def test_from_json_redraws_plots_and_rewrites_the_readme(quick_run, tmp_path, monkeypatch):
    from bench import _readme

    _, out = quick_run
    (json_path,) = out.glob("bench-*.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{_readme.START}\n{_readme.END}\n")
    monkeypatch.setattr(run, "README", readme)
    monkeypatch.setattr(run, "DOCS_PLOTS", tmp_path / "docs")
    assert run.main(["--from-json", str(json_path), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "bench-entropy_norm.png").stat().st_size > 0
    assert (tmp_path / "docs" / "entropy_norm.png").stat().st_size > 0
    table = readme.read_text()
    assert "| entropy_norm | " in table and "torch " in table  # the rows, and the machine line above them
