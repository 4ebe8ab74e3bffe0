"""A vision-language job end to end on real vLLM (the CPU build): the tiny random
Idefics3 made on the spot, served on the local and the docker providers, and a pytest
suite that sends images as base64 data URLs (jobs/suites/vl-images)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runlib import JOBS, RunProcess, run_env, wait_no_processes

pytestmark = [pytest.mark.vllm]


@pytest.fixture(scope="module")
def tiny_vl_model(cpu_env_python) -> Path:
    from ephemera.builtins.tiny_model import ensure_tiny_vl_model

    return ensure_tiny_vl_model(print)


def vl_env(tmp_path: Path, model: Path) -> dict[str, str]:
    return run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                   EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"),
                   EPHEMERA_CONFIG=str(tmp_path / "none.toml"),
                   EPHEMERA_CACHE_DIR=str(model.parent.parent))


def check_passed(run: RunProcess, provider: str) -> dict:
    code, result = run.finish(timeout=560)
    assert code == 0, run.stderr[-4000:]
    assert result["status"] == "passed" and result["provider"] == provider
    artifacts = Path(result["artifacts_dir"])
    junit = (artifacts / "junit.xml").read_text()
    assert 'tests="4"' in junit and 'failures="0"' in junit and "test_counting_squares" in junit
    log = (artifacts / "vllm.log").read_text()
    assert "limit_mm_per_prompt" in log and "Application startup complete" in log
    return result


@pytest.mark.timeout(600)
def test_vl_job_passes_on_the_local_provider(tmp_path, tiny_vl_model):
    run = RunProcess(JOBS / "local-cpu-vl.yaml", vl_env(tmp_path, tiny_vl_model), cwd=tmp_path)
    result = check_passed(run, "local")
    assert wait_no_processes(result["run_id"]) == []


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_vl_job_passes_on_the_docker_provider(tmp_path, docker_engine, cpu_image, tiny_vl_model):
    import docker

    run = RunProcess(JOBS / "docker-cpu-vl.yaml", vl_env(tmp_path, tiny_vl_model), cwd=tmp_path)
    result = check_passed(run, "docker")
    client = docker.from_env()
    try:
        left = client.containers.list(all=True, filters={"label": f"dev.ephemera.run-id={result['run_id']}"})
    finally:
        client.close()
    assert left == []
