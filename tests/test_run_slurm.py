"""`ephemera run` through a real one-node Slurm (tests/fixtures/slurm.py): real vLLM
end to end, a queue that outlasts its timeout, and a run whose deadline passes while
ephemera itself is SIGKILLed. Each checks that no job, process or directory is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.standin_targets import STANDIN
from tests.runlib import JOBS, RunProcess, processes_of, run_env, wait_no_processes, write_job


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                   EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"),
                   EPHEMERA_CONFIG=str(tmp_path / "none.toml"),
                   EPHEMERA_SLURM_WORKROOT=str(tmp_path / "slurm-runs"), **extra)


def _jobs_of(run_id: str) -> list[dict]:
    out = subprocess.run(["squeue", "--json"], capture_output=True, text=True, timeout=30, check=True)
    return [j for j in json.loads(out.stdout)["jobs"] if j["name"] == f"ephemera-{run_id}"
            and j["job_state"] in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")]


def _assert_clean(tmp_path: Path, run_id: str) -> None:
    assert _jobs_of(run_id) == []
    assert wait_no_processes(run_id) == []
    assert not (tmp_path / "slurm-runs" / run_id).exists()


def _standin_job(tmp_path: Path, name: str, **changes) -> Path:
    standin = tmp_path / "standin"
    if not standin.exists():
        import shutil

        shutil.copytree(STANDIN, standin)
    return write_job(tmp_path, "slurm-cpu-smoke.yaml", {
        "name": name,
        "server": {"python": "/usr/bin/python3", "args": [], "env": {"PYTHONPATH": "suite/standin"},
                   "health_timeout": "1m"},
        "suite": {"files": ["standin"], "command": "echo suite-started", "timeout": "1m"},
        "artifacts": [], "timeout": "5m", **changes,
    })


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_cpu_job_passes_end_to_end_through_slurm(tmp_path, slurm_cluster, cpu_env_python, tiny_model):
    env = _env(tmp_path, VLLM_PYTHON=str(cpu_env_python))
    run = RunProcess(JOBS / "slurm-cpu-smoke.yaml", env, cwd=tmp_path)
    code, result = run.finish(timeout=840)
    assert code == 0, run.stderr[-4000:]
    assert result["status"] == "passed" and result["provider"] == "slurm"
    names = [p["name"] for p in result["phases"]]
    assert names.index("queue") < names.index("health") < names.index("suite")
    artifacts = Path(result["artifacts_dir"])
    assert "5 passed" in (artifacts / "suite.log").read_text()
    assert "Application startup complete" in (artifacts / "vllm.log").read_text()
    assert "left the queue" in run.stderr
    _assert_clean(tmp_path, result["run_id"])


@pytest.mark.timeout(300)
def test_a_job_pending_past_the_queue_timeout_is_cancelled_and_reported(tmp_path, slurm_cluster):
    # Another job holds both GPUs: ours waits with Slurm's reason "Resources".
    blocker = subprocess.run(["sbatch", "--parsable", "--job-name=blocker", f"--gres=gpu:{slurm_cluster.gpu_type}:2",
                              "--mem=100M", "--cpus-per-task=1", "--time=5", "--output=/dev/null",
                              "--wrap=sleep 300"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    try:
        job = _standin_job(tmp_path, "slurm-queue")
        run = RunProcess(job, _env(tmp_path, EPHEMERA_SLURM_QUEUE_TIMEOUT="8"), cwd=tmp_path)
        code, result = run.finish(timeout=240)
    finally:
        subprocess.run(["scancel", blocker], timeout=30)
    assert code != 0 and result["status"] == "timeout", run.stderr[-3000:]
    assert "phase 'queue' ran out after 8s" in result["message"]
    assert "PENDING (Resources)" in result["message"]
    names = [p["name"] for p in result["phases"]]
    assert "queue" in names and "boot" not in names and "server_start" not in names
    assert result["cost"]["billed_seconds"] < 8   # the wait in the queue is not billed
    _assert_clean(tmp_path, result["run_id"])


@pytest.mark.timeout(400)
def test_the_job_ends_itself_at_the_deadline_while_ephemera_is_sigkilled(tmp_path, slurm_cluster):
    job = _standin_job(tmp_path, "slurm-deadline", timeout="40s",
                       suite={"files": ["standin"], "command": "sleep 600", "timeout": "10m"})
    env = _env(tmp_path, EPHEMERA_EXPIRY_GRACE_SECONDS="5")
    run = RunProcess(job, env, cwd=tmp_path)
    run.wait_for("> suite", timeout=120)
    run_id = run.run_id()
    assert _jobs_of(run_id) and processes_of(run_id)
    os.kill(run.proc.pid, signal.SIGKILL)
    run.finish(timeout=10)
    started = time.monotonic()
    while _jobs_of(run_id) and time.monotonic() - started < 180:
        time.sleep(1)
    assert _jobs_of(run_id) == [], "the Slurm job outlived the run's expiry"
    assert wait_no_processes(run_id, timeout=15) == []
    assert not (tmp_path / "slurm-runs" / run_id).exists()
    state = json.loads((tmp_path / "state" / "runs" / f"{run_id}.json").read_text())
    assert state["status"] == "active"   # ephemera never got to its teardown
