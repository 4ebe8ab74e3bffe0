"""The run history on a real SQLite file: grouping over 1,000 runs, concurrent writers
from separate processes, idempotent import of cost.json files, and the cost command."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from ephemera.cli import cli
from ephemera.errors import ConfigError
from ephemera.results import history
from ephemera.results.cost import CIContext, PhaseTiming, compute_cost, write_cost_files
from ephemera.results.history import RunRecord, import_cost_files, record_run, summarize

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
JOBS = ("qwen3-4b", "llama-8b", "mistral-7b")
TIERS = ("smoke", "full", "release")
INSTANCES = ("g5.xlarge", "g6e.2xlarge", "p4d.24xlarge", "g6.xlarge")
STATUSES = ("passed", "passed", "passed", "failed", "error")


def synthetic(i: int) -> RunRecord:
    """Run i of a deterministic synthetic history spread over 40 days."""
    return RunRecord(
        run_id=f"run-{i:05d}",
        job=JOBS[i % 3],
        tier=TIERS[i % 3 if i % 7 else 0],
        model=f"org/model-{i % 5}",
        provider="aws" if i % 4 else "docker",
        instance_type=INSTANCES[i % 4],
        region="us-east-1",
        status=STATUSES[i % 5],
        exit_code=0 if STATUSES[i % 5] == "passed" else 1,
        started_at=NOW - timedelta(hours=i * 40 * 24 / 1000),
        duration_seconds=60.0 + i % 11,
        cost_usd=round(0.01 * (i % 13), 2),
        phases={"provision": 20.0, "suite": 30.0},
    )


def bulk_insert(records: list[RunRecord]) -> None:
    for record in records:
        record_run(record)


def expected_groups(records, key, since_s=None):
    cutoff = NOW.timestamp() - since_s if since_s else -1
    groups = defaultdict(list)
    for r in records:
        if r.started_at.timestamp() >= cutoff:
            groups[key(r)].append(r)
    return groups


@pytest.fixture
def thousand_runs():
    records = [synthetic(i) for i in range(1000)]
    bulk_insert(records)
    return records


@pytest.mark.timeout(120)
def test_thousand_runs_grouped_correctly(thousand_runs):
    assert history.count_runs() == 1000
    keys = {
        "job": lambda r: r.job,
        "tier": lambda r: r.tier,
        "model": lambda r: r.model,
        "instance": lambda r: r.instance_type,
        "provider": lambda r: r.provider,
        "day": lambda r: r.started_at.strftime("%Y-%m-%d"),
    }
    for by, key in keys.items():
        for since in (None, 30 * 86400, 3 * 86400):
            rows = {g.key: g for g in summarize(since, by, now=NOW.timestamp())}
            want = expected_groups(thousand_runs, key, since)
            assert set(rows) == set(want), (by, since)
            for name, runs in want.items():
                got = rows[name]
                passed = sum(r.status == "passed" for r in runs)
                assert got.runs == len(runs)
                assert got.passed == passed and got.failed == len(runs) - passed
                assert got.pass_rate == pytest.approx(passed / len(runs))
                assert got.cost_usd == pytest.approx(sum(r.cost_usd for r in runs))
                assert got.mean_duration_seconds == pytest.approx(
                    sum(r.duration_seconds for r in runs) / len(runs))
    (total,) = summarize(30 * 86400, None, now=NOW.timestamp())
    assert total.runs == len(expected_groups(thousand_runs, lambda r: 0, 30 * 86400)[0])
    assert 700 < total.runs < 800


def test_bad_grouping_is_refused():
    with pytest.raises(ConfigError, match="--by"):
        summarize(None, "colour")


def test_empty_history_answers_without_creating_the_file():
    assert summarize(86400, "job") == []
    assert not history.history_path().exists()


def test_row_keeps_every_field():
    record = RunRecord(
        run_id="r-x", job="j", tier=None, model="m", provider="aws", instance_type="g5.xlarge",
        region="eu-west-1", status="failed", exit_code=1, started_at=NOW, duration_seconds=12.5,
        cost_usd=0.5, phases={"suite": 3.0}, commit="abc", ci_run_id="5-1", repository="o/r")
    record_run(record)
    row = history.get_run("r-x")
    assert row["phases"] == {"suite": 3.0}
    assert (row["commit_sha"], row["ci_run_id"], row["repository"]) == ("abc", "5-1", "o/r")
    assert row["started_at"] == NOW.timestamp() and row["region"] == "eu-west-1"
    with sqlite3.connect(history.history_path()) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---- concurrency ------------------------------------------------------------------

def _writer(db: str, prefix: str, count: int, start: multiprocessing.synchronize.Event) -> None:
    start.wait(10)
    for i in range(count):
        record_run(RunRecord(
            run_id=f"{prefix}-{i}", job=prefix, tier="smoke", model="m", provider="local",
            instance_type="cpu", region=None, status="passed", exit_code=0,
            started_at=datetime.now(UTC), duration_seconds=1.0, cost_usd=0.0, phases={}),
            path=Path(db))


def _lock_holder(db: str, locked: multiprocessing.synchronize.Event, hold: float) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE runs SET status = status")
    locked.set()
    time.sleep(hold)
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.timeout(120)
def test_two_processes_writing_at_once_both_land(tmp_path):
    db = tmp_path / "shared" / "history.sqlite3"   # fresh file: both race to create it too
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(db), name, 100, start)) for name in ("a", "b")]
    for p in procs:
        p.start()
    time.sleep(1.5)  # let both interpreters come up and wait at the barrier
    start.set()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    assert history.count_runs(path=db) == 200
    rows = {g.key: g.runs for g in summarize(None, "job", path=db)}
    assert rows == {"a": 100, "b": 100}


@pytest.mark.timeout(120)
def test_writer_waits_for_a_held_lock(tmp_path):
    db = tmp_path / "history.sqlite3"
    record_run(synthetic(0), path=db)
    ctx = multiprocessing.get_context("spawn")
    locked = ctx.Event()
    holder = ctx.Process(target=_lock_holder, args=(str(db), locked, 2.0))
    holder.start()
    assert locked.wait(60)
    began = time.monotonic()
    record_run(synthetic(1), path=db)
    waited = time.monotonic() - began
    holder.join(30)
    assert holder.exitcode == 0
    assert waited > 0.2      # it really had to wait for the other process
    assert history.count_runs(path=db) == 2


# ---- import and the command -------------------------------------------------------

def write_report(directory: Path, run_id: str, status: str, job: str = "qwen3-4b",
                 launched_at: datetime | None = None) -> Path:
    t0 = launched_at or NOW - timedelta(days=1)
    report = compute_cost(
        run_id=run_id, job=job, tier="full", model="Qwen/Qwen3-4B", provider="aws",
        instance_type="g5.xlarge", region="us-east-1", spot=False, price_per_hour=1.006,
        price_source="built-in catalog 2026-11-01", launched_at=t0,
        terminated_at=t0 + timedelta(seconds=600),
        phases=[PhaseTiming("suite", t0, t0 + timedelta(seconds=600))],
        ci=CIContext(commit="c0ffee", run_id="77-1", repository="acme/llm"),
    ).with_outcome(status, 0 if status == "passed" else 1)
    json_path, _ = write_cost_files(report, directory / run_id)
    return json_path


def test_import_is_idempotent_and_reads_directories(tmp_path):
    artifacts = tmp_path / "downloaded"
    first = write_report(artifacts, "ci-1", "passed")
    write_report(artifacts, "ci-2", "failed")
    result = import_cost_files([first])
    assert (result.added, result.already_present) == (1, 0)
    result = import_cost_files([artifacts])
    assert (result.added, result.already_present, result.files) == (1, 1, 2)
    assert import_cost_files([artifacts]).added == 0
    assert history.count_runs() == 2
    row = history.get_run("ci-1")
    assert row["commit_sha"] == "c0ffee" and row["ci_run_id"] == "77-1" and row["source"] == "import"
    assert row["cost_usd"] == pytest.approx(600 * 1.006 / 3600)


def test_import_checks_every_file_before_writing(tmp_path):
    good = write_report(tmp_path, "ok-1", "passed")
    bad = tmp_path / "bad.json"
    bad.write_text('{"run_id": "x"}')
    with pytest.raises(ConfigError, match="'job' is missing"):
        import_cost_files([good, bad])
    assert history.count_runs() == 0


def test_cost_command_table_json_and_import(tmp_path):
    # The command measures --since from the real clock, so these runs are dated from it
    # too (a fixed date falls out of "7d" a week later).
    yesterday = datetime.now(UTC) - timedelta(days=1)
    artifacts = tmp_path / "dl"
    write_report(artifacts, "ci-1", "passed", job="alpha", launched_at=yesterday)
    write_report(artifacts, "ci-2", "failed", job="alpha", launched_at=yesterday)
    write_report(artifacts, "ci-3", "passed", job="beta", launched_at=yesterday)
    runner = CliRunner()
    out = runner.invoke(cli, ["cost", "--import", str(artifacts)])
    assert out.exit_code == 0, out.output
    assert "imported 3 run(s)" in out.output
    out = runner.invoke(cli, ["cost", "--by", "job", "--since", "7d", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    groups = {g["key"]: g for g in data["groups"]}
    assert groups["alpha"]["runs"] == 2 and groups["alpha"]["pass_rate"] == 0.5
    assert data["total"]["runs"] == 3 and data["since_seconds"] == 7 * 86400
    out = runner.invoke(cli, ["cost", "--by", "instance"])
    assert out.exit_code == 0 and "g5.xlarge" in out.output and "total: 3 run(s)" in out.output
    # --since is relative to now: runs from yesterday fall outside 1h
    out = runner.invoke(cli, ["cost", "--since", "1h", "--json"])
    assert json.loads(out.output)["total"]["runs"] == 0


@pytest.mark.parametrize("args, needle", [
    (["cost", "--since", "3x"], "--since"),
    (["cost", "--by", "colour"], "--by"),
    (["cost", "--import"], "--import needs"),
])
def test_cost_command_bad_input(args, needle):
    runner = CliRunner()
    result = runner.invoke(cli, args)
    assert result.exit_code != 0
    text = result.output + (str(result.exception) if result.exception else "")
    assert needle in text


def test_since_parsing():
    from ephemera.cli.cost import parse_since

    assert parse_since("30d") == 30 * 86400
    assert parse_since("1d12h") == 36 * 3600
    assert parse_since("90m") == 5400
    assert parse_since("all") is None
