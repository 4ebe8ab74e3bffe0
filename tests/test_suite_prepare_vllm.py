"""`suite.prepare` overlaps vLLM's start for real: the docker provider, the built-in CPU
image, real vLLM serving the tiny model, and a prepare step of 20 s. The phase start
times in `--json` show the overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runlib import RunProcess, run_env, write_job

pytestmark = [pytest.mark.vllm, pytest.mark.docker]

PREPARE = 20


@pytest.mark.timeout(600)
def test_a_passing_prepare_overlaps_the_health_wait(tmp_path, docker_engine, cpu_image, tiny_model):
    env = run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                  EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"),
                  EPHEMERA_CONFIG=str(tmp_path / "none.toml"))
    job = write_job(tmp_path, "docker-cpu-smoke.yaml", {
        "suite": {"prepare": [f"sleep {PREPARE}", "echo prepared > prepared.txt"],
                  "setup": ["test -f prepared.txt"]}})
    run = RunProcess(job, env)
    code, result = run.finish(timeout=560)
    assert code == 0, run.stderr[-4000:]
    phases = {p["name"]: p for p in result["phases"]}
    prepare, health, suite = phases["prepare"], phases["health"], phases["suite"]
    assert prepare["ok"] and health["ok"] and suite["ok"]
    prepare_end = prepare["start"] + prepare["seconds"]
    health_end = health["start"] + health["seconds"]
    # Started with the server, and most of it ran while vLLM was starting.
    assert phases["server_start"]["start"] <= prepare["start"] <= health["start"] + 1.0
    assert PREPARE <= prepare["seconds"] < PREPARE + 10
    overlap = min(prepare_end, health_end) - max(prepare["start"], health["start"])
    assert overlap >= min(prepare["seconds"], health["seconds"]) - 2.0, result["phases"]
    # The suite started once both had ended.
    assert suite["start"] >= max(prepare_end, health_end) - 0.01
    artifacts = Path(result["artifacts_dir"])
    assert (artifacts / "suite-prepare.log").exists()
    assert 'tests="5"' in (artifacts / "junit.xml").read_text()
    assert "where the time went:" in run.stderr
