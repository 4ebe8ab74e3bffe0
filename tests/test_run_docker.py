"""`ephemera run` end to end with the docker provider: the built-in CPU image on a real
Docker engine, host networking (loopback only), the tiny model, the real suite."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.runlib import JOBS, RunProcess, run_env, write_job

pytestmark = [pytest.mark.vllm, pytest.mark.docker]


@pytest.fixture
def env(tmp_path, docker_engine, cpu_image, tiny_model):
    return run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                   EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"), EPHEMERA_CONFIG=str(tmp_path / "none.toml"))


def containers_of(run_id: str) -> list[str]:
    import docker

    client = docker.from_env()
    try:
        return [c.name for c in client.containers.list(all=True, filters={"label": f"dev.ephemera.run-id={run_id}"})]
    finally:
        client.close()


@pytest.mark.timeout(600)
def test_docker_job_passes_end_to_end(tmp_path, env):
    run = RunProcess(JOBS / "docker-cpu-smoke.yaml", env, cwd=tmp_path)
    code, result = run.finish(timeout=560)
    assert code == 0, run.stderr[-4000:]
    assert result["status"] == "passed" and result["provider"] == "docker"
    artifacts = Path(result["artifacts_dir"])
    assert 'tests="5"' in (artifacts / "junit.xml").read_text()
    assert "Application startup complete" in (artifacts / "vllm.log").read_text()
    assert (artifacts / "cost.json").exists()
    assert containers_of(result["run_id"]) == []


@pytest.mark.timeout(300)
def test_sigint_during_health_removes_the_container_quickly(tmp_path, env):
    job = write_job(tmp_path, "docker-cpu-smoke.yaml")
    run = RunProcess(job, env)
    run.wait_for("> health", timeout=200)
    run_id = run.run_id()
    assert containers_of(run_id), "the run's container should be up"
    run.signal(signal.SIGINT)
    code, result = run.finish(timeout=60)
    assert code == 130, run.stderr[-3000:]
    assert result["teardown_verified"] is True
    assert (Path(result["artifacts_dir"]) / "vllm.log").exists()
    assert containers_of(run_id) == []


@pytest.mark.timeout(120)
def test_missing_image_is_a_clear_error_and_leaves_nothing(tmp_path, env):
    job = write_job(tmp_path, "docker-cpu-smoke.yaml", {"image": "ephemera-test/does-not-exist:1.0",
                                                        "server": {"launcher": "api_server"}})
    run = RunProcess(job, env)
    code, result = run.finish(timeout=100)
    assert code in (2, 3), run.stderr[-3000:]
    assert "ephemera-test/does-not-exist:1.0" in result["message"]
    assert "Traceback" not in run.stderr
    assert containers_of(result["run_id"]) == []
