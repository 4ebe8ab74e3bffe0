"""`ephemera ls` and `ephemera logs`, on a live docker run (the stand-in server, a suite
that writes a line a second) followed from another process, and afterwards from the
state, the history and the artifacts."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.runlib import EPHEMERA, RunProcess, ephemera, run_env

SUITE_LINES = 6


class Follower:
    """`ephemera logs RUN --follow` in its own process; lines with when they came."""

    def __init__(self, run_id: str, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([*EPHEMERA, "logs", run_id, "--follow", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def finish(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    def when(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)


@pytest.mark.timeout(300)
def test_ls_and_logs_follow_a_live_docker_run(docker_target):
    target = docker_target
    job_text = target.job.read_text().replace(
        "command: echo suite-started",
        f"command: for i in $(seq {SUITE_LINES}); do echo suite-line-$i; sleep 1; done")
    target.job.write_text(job_text)
    run = RunProcess(target.job, target.env, *target.args)
    try:
        run.wait_for("> health", timeout=120)
        run_id = run.run_id()
        follower = Follower(run_id, target.env)
        run.wait_for("suite-line-1", timeout=60)
        listed = ephemera("ls", "--json", env=target.env, timeout=60)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)["runs"]
        live = rows[0]
        assert live["run_id"] == run_id and live["live"] is True, rows
        assert live["status"] == "active" and live["provider"] == "docker"
        assert live["instance"] == "docker" and live["cost_usd"] == 0.0
        assert datetime.fromisoformat(live["expires_at"]) > datetime.now(UTC)
        table = ephemera("ls", env=target.env, timeout=60).stdout.splitlines()
        assert table[0].split() == ["RUN", "STATUS", "PROVIDER", "INSTANCE", "AGE", "EXPIRES", "COST"]
        assert table[1].split()[:4] == [run_id, "active", "docker", "docker"]
        code, result = run.finish(timeout=120)
        ended = time.monotonic()
        assert code == 0, run.stderr[-3000:]
        assert follower.finish(timeout=60) == 0, follower.proc.stderr.read()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    texts = [line for _, line in follower.lines]
    suite = [line for line in texts if line.startswith("suite| suite-line-")]
    assert suite == [f"suite| suite-line-{i}" for i in range(1, SUITE_LINES + 1)], texts
    assert any(line.startswith("server| stand-in for vLLM serving") for line in texts), texts
    first = follower.when("suite-line-1")
    assert first is not None and first < ended - 2, "suite lines came only after the run ended"
    assert target.leftovers(run_id) == []

    after = ephemera("ls", "--json", env=target.env, timeout=60)
    row = next(r for r in json.loads(after.stdout)["runs"] if r["run_id"] == run_id)
    assert row["live"] is False and row["status"] == "passed" and row["provider"] == "docker"
    server = ephemera("logs", run_id, "--server", env=target.env, timeout=60)
    assert server.returncode == 0 and "stand-in for vLLM serving" in server.stdout
    assert "suite-line" not in server.stdout and "server| " not in server.stdout
    suite_only = ephemera("logs", run_id, "--suite", env=target.env, timeout=60)
    assert suite_only.stdout.splitlines()[-SUITE_LINES:] == [
        f"suite-line-{i}" for i in range(1, SUITE_LINES + 1)]


def test_logs_of_an_unknown_run_is_bad_input(tmp_path):
    env = run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"),
                  EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"))
    result = ephemera("logs", "no-such-run", env=env, timeout=60)
    assert result.returncode == 2
    assert "run 'no-such-run' is not known here" in result.stderr


def test_ls_puts_live_runs_first_and_marks_orphans(tmp_path):
    """Live runs (their process alive) on top, newest first; an active state whose
    process is gone says so; history rows follow; a damaged state file is a warning."""
    import os

    from ephemera.lifecycle.state import RunState, save_state
    from ephemera.results.history import RunRecord, record_run

    state_dir, data = tmp_path / "state", tmp_path / "data"
    env = run_env(EPHEMERA_STATE_DIR=str(state_dir), EPHEMERA_DATA_DIR=str(data))
    now = datetime.now(UTC)
    mine = RunState(run_id="job-live", job="job", provider="docker", labels={},
                    expires_at=now + timedelta(hours=1), status="active",
                    created_at=now - timedelta(minutes=30), extra={"price_per_hour": 2.0})
    orphan = RunState(run_id="job-orphan", job="job", provider="aws", labels={},
                      expires_at=now + timedelta(minutes=5), status="active",
                      created_at=now - timedelta(minutes=2), pid=2**31 - 1, pid_start="x")
    save_state(state_dir, mine)
    save_state(state_dir, orphan)
    (state_dir / "runs" / "broken.json").write_text("[]")
    record_run(RunRecord(run_id="job-old", job="job", tier=None, model="m", provider="local",
                         instance_type="local-cpu", region=None, status="failed", exit_code=1,
                         started_at=now - timedelta(days=1), duration_seconds=10.0,
                         cost_usd=0.25, phases={}), path=data / "history.sqlite3")
    assert os.getpid() == mine.pid
    from ephemera.cli.ls import history_rows, state_rows
    from ephemera.spec.settings import reset_settings

    os.environ.update({"EPHEMERA_STATE_DIR": str(state_dir), "EPHEMERA_DATA_DIR": str(data)})
    reset_settings()
    rows, problems = state_rows(now)
    assert [r["run_id"] for r in rows] == ["job-live", "job-orphan"]
    assert rows[0]["live"] is True and rows[0]["cost_usd"] == pytest.approx(1.0, abs=0.01)
    assert rows[1]["status"] == "active (no process: ephemera down)"
    assert problems and "broken.json" in problems[0]
    old = history_rows(now, 20, set())
    assert [(r["run_id"], r["status"], r["cost_usd"]) for r in old] == [("job-old", "failed", 0.25)]
    listed = ephemera("ls", env=env, timeout=60)
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [
        "job-live", "job-orphan", "job-old"]
    assert "skipping a state file" in listed.stderr
