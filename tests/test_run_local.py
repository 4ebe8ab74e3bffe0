"""`ephemera run` end to end with the local provider: real vLLM (CPU build) serving the
tiny model, a real pytest suite, real signals. Every test checks that nothing of
the run is left running and that the logs came back. Where the suite's end is the point
(a failing or flooding suite, its timeout, a signal during it), the server is the small
real stand-in for vLLM (tests/standin)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.standin_targets import standin_server
from tests.runlib import (
    JOBS,
    RunProcess,
    deep_update,
    ephemera,
    processes_of,
    run_env,
    wait_no_processes,
    write_job,
)

pytestmark = [pytest.mark.vllm]


@pytest.fixture
def env(tmp_path, cpu_env_python, tiny_model):
    """The process environment for `ephemera run` (built-ins are ready)."""
    return run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                   EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"),
                   EPHEMERA_CONFIG=str(tmp_path / "none.toml"))


def state_of(tmp_path: Path, run_id: str) -> dict:
    return json.loads((tmp_path / "state" / "runs" / f"{run_id}.json").read_text())


def assert_clean(tmp_path: Path, run_id: str) -> None:
    left = wait_no_processes(run_id)
    assert left == [], f"processes of {run_id} left running: {left}"
    assert state_of(tmp_path, run_id)["status"] == "terminated"
    workdir = tmp_path / "state" / "local" / run_id
    assert not workdir.exists(), f"{workdir} was not removed"


@pytest.mark.timeout(600)
def test_main_job_passes_end_to_end(tmp_path, env):
    """The README's main command: jobs/local-cpu-smoke.yaml passes, and the cost files,
    the history row and the GitHub step summary agree."""
    summary = tmp_path / "step-summary.md"
    env = {**env, "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_SHA": "abc123", "GITHUB_RUN_ID": "77",
           "GITHUB_RUN_ATTEMPT": "1"}
    run = RunProcess(JOBS / "local-cpu-smoke.yaml", env, cwd=tmp_path)
    code, result = run.finish(timeout=560)
    assert code == 0, run.stderr[-4000:]
    assert result["status"] == "passed" and result["exit_code"] == 0
    assert result["provider"] == "local" and result["instance_type"] == "local-cpu"
    names = [p["name"] for p in result["phases"]]
    for phase in ("plan", "provision", "boot", "upload", "server_start", "health", "suite", "collect", "teardown"):
        assert phase in names
    run_id = result["run_id"]
    assert run_id.startswith("local-cpu-smoke-")
    artifacts = Path(result["artifacts_dir"])
    assert artifacts == tmp_path / "runs" / run_id
    junit = (artifacts / "junit.xml").read_text()
    assert 'tests="5"' in junit and 'failures="0"' in junit
    assert "Application startup complete" in (artifacts / "vllm.log").read_text()
    assert "5 passed" in (artifacts / "suite.log").read_text()
    assert (artifacts / "artifacts" / "smoke-notes.txt").read_text() == "model=ephemera/tiny-llama\n"
    assert_clean(tmp_path, run_id)

    cost = json.loads((artifacts / "cost.json").read_text())
    assert cost["run_id"] == run_id and cost["provider"] == "local"
    assert cost["termination_verified"] is True
    assert cost["cost_usd"] == 0.0  # this machine is free
    assert cost["billed_seconds"] >= 1
    assert "local-cpu" in (artifacts / "cost.md").read_text()

    history = ephemera("cost", "--by", "job", "--json", env=env)
    assert history.returncode == 0, history.stderr
    rows = json.loads(history.stdout)
    groups = rows["groups"] if isinstance(rows, dict) else rows
    group = next(g for g in groups if g.get("key", g.get("group")) == "local-cpu-smoke")
    assert group["runs"] == 1

    text = summary.read_text()
    assert "local-cpu-smoke" in text and "passed" in text
    assert "5 passed, 0 failed" in text
    assert run_id in text


@pytest.mark.timeout(600)
def test_failing_suite_with_10mib_on_both_streams(tmp_path, env):
    """The suite fails after writing 10 MiB to stdout and to stderr: no deadlock, exit 1,
    the whole output and the server log come back, a secret never shows."""
    flood = ("import sys; chunk = 'x' * 1023 + '\\n'; "
             "[(sys.stdout.write(chunk), sys.stderr.write(chunk)) for _ in range(10240)]; "
             "print('secret is', __import__('os').environ['MY_API_TOKEN']); sys.exit(3)")
    job = write_job(tmp_path, "local-cpu-smoke.yaml", deep_update(standin_server(tmp_path, sys.executable), {
        "suite": {"command": f'python -c "{flood}"'},
        "env": {"MY_API_TOKEN": "tok-very-secret-42"},
    }))
    # Price this machine at $3.60/h through a catalog file, so the cost is not zero.
    catalog = tmp_path / "priced.csv"
    catalog.write_text("provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price_per_hour\n"
                       "local,local-cpu,,,0,0,2,16,3.60\n")
    run = RunProcess(job, env, "--catalog", str(catalog))
    code, result = run.finish(timeout=560)
    assert code == 1, run.stderr[-3000:]
    assert result["status"] == "failed"
    artifacts = Path(result["artifacts_dir"])

    # cost.json, cost.md and the history row agree.
    cost = json.loads((artifacts / "cost.json").read_text())
    assert cost["price_per_hour"] == 3.60 and cost["status"] == "failed"
    assert cost["cost_usd"] == pytest.approx(cost["billed_seconds"] * 0.001, abs=1e-6)
    assert cost["cost_usd"] > 0
    assert f"{cost['cost_usd']:.4f}" in (artifacts / "cost.md").read_text()
    history = ephemera("cost", "--by", "job", "--json", env=env)
    rows = json.loads(history.stdout)
    groups = rows["groups"] if isinstance(rows, dict) else rows
    group = next(g for g in groups if g.get("key") == job.stem)
    assert group["runs"] == 1 and group["passed"] == 0
    assert group["cost_usd"] == pytest.approx(cost["cost_usd"], abs=1e-6)
    assert group["billed_seconds"] == pytest.approx(cost["billed_seconds"])

    log = (artifacts / "suite.log").read_text()
    assert log.count("x" * 1023) == 2 * 10240
    assert "tok-very-secret-42" not in log and "tok-very-secret-42" not in run.stderr
    assert "secret is ***" in log
    assert (artifacts / "vllm.log").exists()
    assert_clean(tmp_path, result["run_id"])


@pytest.mark.timeout(600)
def test_suite_past_its_timeout_is_stopped(tmp_path, env):
    job = write_job(tmp_path, "local-cpu-smoke.yaml", deep_update(standin_server(tmp_path, sys.executable),
                                                                  {"suite": {"command": "sleep 600", "timeout": "5s"}}))
    run = RunProcess(job, env)
    code, result = run.finish(timeout=560)
    assert code == 4, run.stderr[-3000:]
    assert result["status"] == "timeout"
    assert "phase 'suite'" in result["message"]
    assert (Path(result["artifacts_dir"]) / "vllm.log").exists()
    assert_clean(tmp_path, result["run_id"])


@pytest.mark.timeout(600)
def test_sigterm_during_the_suite(tmp_path, env):
    job = write_job(tmp_path, "local-cpu-smoke.yaml", deep_update(standin_server(tmp_path, sys.executable),
                                                                  {"suite": {"command": "echo suite-started; sleep 600"}}))
    run = RunProcess(job, env)
    run.wait_for("suite| suite-started", timeout=500)
    run.signal(signal.SIGTERM)
    code, result = run.finish(timeout=60)
    assert code == 143, run.stderr[-3000:]
    assert result["status"] == "interrupted"
    assert (Path(result["artifacts_dir"]) / "vllm.log").exists()
    assert_clean(tmp_path, result["run_id"])


@pytest.mark.timeout(300)
def test_vllm_crash_at_start_shows_its_log(tmp_path, env):
    job = write_job(tmp_path, "local-cpu-smoke.yaml", {"server": {"args": ["--no-such-flag-xyz"]}})
    run = RunProcess(job, env)
    code, result = run.finish(timeout=280)
    assert code == 3, run.stderr[-3000:]
    assert "vLLM exited while starting" in result["message"]
    assert "no-such-flag-xyz" in result["message"]  # the log tail names the bad argument
    assert "no-such-flag-xyz" in (Path(result["artifacts_dir"]) / "vllm.log").read_text()
    assert_clean(tmp_path, result["run_id"])


@pytest.mark.timeout(300)
def test_vllm_never_healthy_within_the_health_timeout(tmp_path, env):
    job = write_job(tmp_path, "local-cpu-smoke.yaml", {"server": {"health_timeout": "4s"}})
    run = RunProcess(job, env)
    code, result = run.finish(timeout=280)
    assert code == 4, run.stderr[-3000:]
    assert result["status"] == "timeout" and "phase 'health'" in result["message"]
    assert (Path(result["artifacts_dir"]) / "vllm.log").exists()
    assert_clean(tmp_path, result["run_id"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signals,code", [
    (("INT",), 130),
    (("INT", "TERM"), 130),    # what a cancelled GitHub job sends: SIGINT, then SIGTERM
    (("HUP",), 129),
])
def test_signals_during_the_health_wait(tmp_path, env, signals, code):
    job = write_job(tmp_path, "local-cpu-smoke.yaml")
    run = RunProcess(job, env)
    run.wait_for("> health", timeout=120)
    time.sleep(1.0)
    run_id = run.run_id()
    assert processes_of(run_id), "vLLM should be starting"
    sent = time.monotonic()
    for index, name in enumerate(signals):
        if index:
            time.sleep(1.0)
        run.signal(getattr(signal, f"SIG{name}"))
    exit_code, result = run.finish(timeout=60)
    took = time.monotonic() - sent
    assert exit_code == code, run.stderr[-3000:]
    assert result["status"] == "interrupted"
    assert result["teardown_verified"] is True
    assert took < 10, f"teardown took {took:.1f}s; GitHub kills the step 10 s after SIGINT"
    assert (Path(result["artifacts_dir"]) / "vllm.log").exists()
    assert_clean(tmp_path, run_id)


@pytest.mark.timeout(300)
def test_sigkill_then_down_finishes_the_teardown(tmp_path, env):
    job = write_job(tmp_path, "local-cpu-smoke.yaml")
    run = RunProcess(job, env)
    run.wait_for("> health", timeout=120)
    run_id = run.run_id()
    os.killpg(run.proc.pid, signal.SIGKILL) if False else run.signal(signal.SIGKILL)
    run.finish(timeout=30)
    time.sleep(1.0)
    assert processes_of(run_id), "after SIGKILL of ephemera the run's processes are still there"
    down = ephemera("down", run_id, "--json", env=env)
    assert down.returncode == 0, down.stderr
    outcome = json.loads(down.stdout)["runs"][0]
    assert outcome["verified"] is True
    assert_clean(tmp_path, run_id)
    again = ephemera("down", "--all", env=env)
    assert again.returncode == 0 and "nothing to tear down" in again.stderr


@pytest.mark.timeout(300)
def test_sigkill_then_reap_after_expiry(tmp_path, env):
    """ephemera and the dead-man watchdog are both killed (say the runner vanished):
    `reap` finds the run by its labels once it has expired, and ends it."""
    env = {**env, "EPHEMERA_EXPIRY_GRACE_SECONDS": "0"}
    job = write_job(tmp_path, "local-cpu-smoke.yaml", {"timeout": "40s"})
    run = RunProcess(job, env)
    run.wait_for("> health", timeout=60)
    run_id = run.run_id()
    run.signal(signal.SIGKILL)
    run.finish(timeout=30)
    state = state_of(tmp_path, run_id)
    watchdog = int(state["instance"]["data"]["watchdog_pid"])
    os.kill(watchdog, signal.SIGKILL)
    assert processes_of(run_id)
    early = ephemera("reap", "--provider", "local", "--json", env=env)
    assert early.returncode == 0, early.stderr
    assert json.loads(early.stdout)["expired"] == [], "nothing is reaped before its expiry"
    assert processes_of(run_id)
    expires = state["expires_at"]
    from ephemera.provider import parse_time

    wait = (parse_time(expires) - parse_time(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))).total_seconds()
    time.sleep(max(0.0, wait) + 1.5)
    dry = ephemera("reap", "--provider", "local", "--dry-run", "--json", env=env)
    assert [e["run_id"] for e in json.loads(dry.stdout)["expired"]] == [run_id]
    assert processes_of(run_id), "--dry-run touches nothing"
    reaped = ephemera("reap", "--provider", "local", "--json", env=env)
    assert reaped.returncode == 0, reaped.stderr
    items = json.loads(reaped.stdout)["expired"]
    assert [(i["run_id"], i["verified"]) for i in items] == [(run_id, True)]
    assert wait_no_processes(run_id) == []


def test_dry_run_launches_nothing(tmp_path, env):
    result = ephemera("run", str(JOBS / "local-cpu-smoke.yaml"), "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "vllm.entrypoints.openai.api_server" in result.stdout
    assert "--max-model-len 256" in result.stdout and "--dtype bfloat16" in result.stdout
    assert "pytest" in result.stdout and "nothing was launched" in result.stdout
    assert not (tmp_path / "state" / "runs").exists()


def test_no_fitting_machine_is_bad_input_and_launches_nothing(tmp_path, env):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price_per_hour\n"
                       "local,tiny-box,,,0,0,2,0.001,0\n")
    result = ephemera("run", str(JOBS / "local-cpu-smoke.yaml"), "--catalog", str(catalog), env=env)
    assert result.returncode == 2, result.stderr
    assert "tiny-box" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "state" / "runs").exists()
