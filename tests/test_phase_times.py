"""Each phase's start offset beside its length: in `--json`, in the history (a schema
migration that keeps older rows readable) and in the table printed at the end of a run."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from ephemera.errors import InfraError
from ephemera.lifecycle.phase_times import phase_rows, time_table
from ephemera.lifecycle.records import PhaseRecord, RunResult
from ephemera.results import history
from ephemera.results.cost import PhaseTiming, compute_cost

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def _phase(name: str, start: float, seconds: float, ok: bool = True) -> PhaseRecord:
    return PhaseRecord(name=name, started_at=T0 + timedelta(seconds=start),
                       ended_at=T0 + timedelta(seconds=start + seconds), ok=ok)


PHASES = [_phase("plan", 0.1, 0.2), _phase("server_start", 1.0, 0.5),
          _phase("prepare", 1.5, 20.0), _phase("health", 1.6, 30.0),
          _phase("suite", 31.6, 5.0, ok=False)]


def test_rows_give_each_phase_its_start_from_the_runs_start_and_its_length():
    rows = phase_rows(PHASES, T0)
    assert rows[2] == {"name": "prepare", "start": 1.5, "seconds": 20.0, "ok": True}
    assert rows[3] == {"name": "health", "start": 1.6, "seconds": 30.0, "ok": True}
    assert rows[4]["ok"] is False
    # Without the run's start the first phase is the origin.
    assert phase_rows(PHASES, None)[0]["start"] == 0.0
    assert phase_rows(PHASES, None)[3]["start"] == 1.5


def test_run_json_has_phase_starts():
    result = RunResult(run_id="r", status="passed", exit_code=0, job="j", tier=None,
                       provider="docker", phases=PHASES, started_at=T0)
    phases = result.to_dict()["phases"]
    assert [p["name"] for p in phases] == ["plan", "server_start", "prepare", "health", "suite"]
    assert phases[3] == {"name": "health", "start": 1.6, "seconds": 30.0, "ok": True}


def test_the_table_shows_overlapping_phases_on_one_time_line():
    table = time_table(PHASES, T0).splitlines()
    assert table[0].split()[:3] == ["phase", "start", "took"]
    assert "0 to 36.6s" in table[0]
    prepare = next(line for line in table if line.startswith("prepare"))
    health = next(line for line in table if line.startswith("health"))
    suite = next(line for line in table if line.startswith("suite"))
    assert "1.5s" in prepare and "20.0s" in prepare
    assert suite.endswith("(stopped)")
    # The bars overlap where the phases do: both start at the same column.
    bar = lambda line: line[line.index("|") + 1:line.rindex("|")]  # noqa: E731
    assert bar(prepare).index("#") == bar(health).index("#")
    assert bar(prepare).rindex("#") < bar(health).rindex("#")
    assert bar(suite).index("#") > bar(prepare).rindex("#")
    assert time_table([], T0) == ""


def _report():
    return compute_cost(
        run_id="run-1", job="j", tier=None, model="m", provider="docker", instance_type="cpu",
        region=None, spot=False, price_per_hour=1.0, price_source="test",
        launched_at=T0, terminated_at=T0 + timedelta(seconds=40),
        phases=[PhaseTiming(p.name, p.started_at, p.ended_at) for p in PHASES], ci=None)


def test_the_history_records_phase_starts(tmp_path):
    db = tmp_path / "h.sqlite3"
    history.record_run(history.RunRecord.from_report(_report()), path=db)
    row = history.get_run("run-1", path=db)
    assert row["phases"]["prepare"] == 20.0 and row["phases"]["health"] == 30.0
    # Offsets from the run's first phase (plan, at 0.1 s).
    assert row["phase_starts"] == {"plan": 0.0, "server_start": 0.9, "prepare": 1.4,
                                   "health": 1.5, "suite": 31.5}


def test_a_version_3_history_is_migrated_and_its_rows_stay_readable(tmp_path):
    db = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript(history._SCHEMA)
    for version in (2, 3):
        for statement in history._MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO runs (run_id, job, provider, status, started_at, recorded_at, phases) "
                 "VALUES ('old-run', 'retail', 'aws', 'passed', 1.0, 1.0, '{\"suite\": 4.5}')")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    row = history.get_run("old-run", path=db)
    assert row["phases"] == {"suite": 4.5} and row["phase_starts"] == {}
    (version,) = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()
    assert version == history.SCHEMA_VERSION == 4
    history.record_run(history.RunRecord.from_report(_report()), path=db)
    assert history.get_run("run-1", path=db)["phase_starts"]["suite"] == 31.5
    assert history.count_runs(path=db) == 2


def test_a_damaged_phase_starts_column_is_a_clear_error(tmp_path):
    db = tmp_path / "h.sqlite3"
    history.record_run(history.RunRecord.from_report(_report()), path=db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET phase_starts = 'not json' WHERE run_id = 'run-1'")
    with pytest.raises(InfraError, match="column 'phase_starts' is not JSON"):
        history.get_run("run-1", path=db)
