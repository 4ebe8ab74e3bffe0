"""Baselines from the history: the median of the last passing runs of a job and tier on
one branch; the history's schema 3 (branch, results, figures, gates) migrated from 2;
`ephemera baseline` and `ephemera results`."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta

from click.testing import CliRunner

from ephemera.cli import cli
from ephemera.results import history, judgements
from ephemera.results.gates import load_baseline
from ephemera.results.history import RunRecord, record_run
from ephemera.results.judgements import GateRow, record_judgement

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def record(db, run_id: str, *, minutes: int, branch: str = "main", status: str = "passed",
           e2e: float = 100.0, job: str = "retail", tier: str | None = None) -> None:
    record_run(RunRecord(run_id=run_id, job=job, tier=tier, model="m", provider="docker",
                         instance_type="cpu", region=None, status=status, exit_code=0,
                         started_at=T0 + timedelta(minutes=minutes), duration_seconds=60,
                         cost_usd=0.0, phases={}), path=db)
    record_judgement(run_id, branch=branch, commit=f"c{run_id}", metrics={"e2e_p90_ms": e2e},
                     results={"total": {"all": (9, 1, 0, 0)}}, path=db)


def test_median_of_the_last_passing_runs_of_one_branch(tmp_path):
    db = tmp_path / "h.sqlite3"
    for i, e2e in enumerate((500.0, 100.0, 120.0, 110.0)):
        record(db, f"r{i}", minutes=i, e2e=e2e)
    record(db, "failed", minutes=10, status="failed", e2e=9000.0)
    record(db, "other-tier", minutes=11, tier="smoke", e2e=9000.0)
    baseline = load_baseline("retail", None, "main", 3, exclude=None, path=db)
    assert [r["run_id"] for r in baseline.runs] == ["r3", "r2", "r1"]
    assert baseline.median("e2e_p90_ms") == (110.0, ["r3", "r2", "r1"])
    record(db, "feature-run", minutes=20, branch="feature", e2e=9000.0)
    assert load_baseline("retail", None, "main", 3, exclude=None, path=db).median("e2e_p90_ms")[0] == 110.0
    assert load_baseline("retail", None, "feature", 3, exclude=None, path=db).median("e2e_p90_ms")[0] == 9000.0


def test_a_version_2_history_is_migrated_and_its_rows_stay_readable(tmp_path):
    db = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript(history._SCHEMA)
    for statement in history._MIGRATIONS[2]:
        conn.execute(statement)
    conn.execute("INSERT INTO runs (run_id, job, provider, status, started_at, recorded_at) "
                 "VALUES ('old-run', 'retail', 'aws', 'passed', 1.0, 1.0)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    row = history.get_run("old-run", path=db)
    assert row["status"] == "passed" and row["branch"] == ""
    (version,) = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()
    assert version == history.SCHEMA_VERSION
    assert judgements.get_judgement("old-run", path=db)["results"] == {}


def test_results_and_baseline_commands(tmp_path, monkeypatch):
    db = tmp_path / "h.sqlite3"
    monkeypatch.setenv("EPHEMERA_HISTORY_DB", str(db))
    from ephemera.spec.settings import reset_settings

    reset_settings()
    for i in range(3):
        record(db, f"r{i}", minutes=i, e2e=100.0 + i)
    record_judgement("r2", branch="main", commit="abc", metrics={"e2e_p90_ms": 102.0},
                     results={"property:category": {"kitchen_safety": (2, 1, 0, 0)},
                              "total": {"all": (8, 1, 0, 0)}},
                     gates=[GateRow("pass_rate_by", "property:category=kitchen_safety", 2 / 3, 0.95,
                                    None, False, "gate pass_rate_by ...: 66.7% below 95.0%")], path=db)
    runner = CliRunner()
    out = runner.invoke(cli, ["results", "r2"])
    assert out.exit_code == 0, out.output
    assert "kitchen_safety" in out.output and "66.7%" in out.output and "FAIL  gate" in out.output
    data = json.loads(runner.invoke(cli, ["results", "r2", "--json"]).output)
    assert data["branch"] == "main" and data["metrics"]["e2e_p90_ms"] == 102.0
    missing = runner.invoke(cli, ["results", "nope"])
    assert missing.exit_code != 0 and "not in the history" in str(missing.exception)
    out = runner.invoke(cli, ["baseline", "retail", "--ref", "main", "--runs", "5", "--json"])
    data = json.loads(out.output)
    assert [r["run_id"] for r in data["runs"]] == ["r2", "r1", "r0"] and data["median"]["e2e_p90_ms"] == 101.0
    text = runner.invoke(cli, ["baseline", "retail", "--ref", "main"]).output
    assert "median of the last 3 passing run(s)" in text and "101.0 ms" in text
    assert "no baseline" in runner.invoke(cli, ["baseline", "retail", "--ref", "feature"]).output
