"""`ephemera run` through the ssh provider against a real OpenSSH server on 127.0.0.1,
logging in as an unprivileged user (never root) whose Docker runs the job's image."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.standin_targets import standin_server
from tests.runlib import (
    RunProcess,
    deep_update,
    processes_of,
    run_env,
    wait_no_processes,
    write_job,
)

pytestmark = [pytest.mark.vllm, pytest.mark.sshd]


@pytest.fixture
def ssh_job(tmp_path, sshd, docker_engine, cpu_image, tiny_model, docker_login_user):
    """A job on the test sshd as an unprivileged login user that reaches Docker through
    its group (as on the default GPU AMI): never as root. The job's image is the
    built-in CPU image, run through that user's Docker."""

    def make(changes: dict | None = None, login=None) -> tuple[Path, dict[str, str]]:
        """``login``: the LoginUser to log in as (default: the docker-group user)."""
        server = (login or docker_login_user).server
        workroot = (login or docker_login_user).workroot("ssh")
        base = {
            "name": "ssh-cpu-smoke",
            "image": "ephemera/cpu",
            "server": {"launcher": "auto", "python": "python3"},
            "suite": {"command": "cd suites/cpu-smoke && python3 -m pytest -q -p no:cacheprovider "
                                 "--junitxml=junit.xml"},
            "resources": {"provider": "ssh", "ssh": {
                "host": server.host, "port": server.port, "user": server.user, "key": server.key_path,
                "workroot": workroot}},
        }
        job = write_job(tmp_path, "local-cpu-smoke.yaml", _merge(base, changes or {}))
        env = run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                      EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"), EPHEMERA_CONFIG=str(tmp_path / "none.toml"))
        made.append(workroot)
        return job, env

    made: list[str] = []
    yield make
    for workroot in made:
        shutil.rmtree(workroot, ignore_errors=True)


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.mark.timeout(600)
def test_ssh_job_passes_end_to_end(tmp_path, ssh_job):
    job, env = ssh_job()
    run = RunProcess(job, env)
    code, result = run.finish(timeout=560)
    assert code == 0, run.stderr[-4000:]
    assert result["status"] == "passed" and result["provider"] == "ssh"
    artifacts = Path(result["artifacts_dir"])
    assert 'tests="5"' in (artifacts / "junit.xml").read_text()
    assert "Application startup complete" in (artifacts / "vllm.log").read_text()
    run_id = result["run_id"]
    assert wait_no_processes(run_id) == []
    remote_dir = Path(yaml_workroot(job)) / run_id
    assert not remote_dir.exists(), "the run's directory on the host is removed"
    state = json.loads((tmp_path / "state" / "runs" / f"{run_id}.json").read_text())
    assert state["status"] == "terminated"


@pytest.mark.timeout(600)
def test_frozen_ssh_peer_fails_within_the_deadline(tmp_path, ssh_job, sshd):
    """The sshd session serving the run is stopped with SIGSTOP during the suite: the TCP
    connection stays up and nothing answers. The run must fail by its suite deadline,
    tear down over a fresh connection, and not hang. (The server is the small real
    stand-in for vLLM: the channel is the point.)"""
    job, env = ssh_job(deep_update(standin_server(tmp_path, "python3"),
                                   {"suite": {"command": "echo suite-started; sleep 600", "timeout": "10s"}}))
    run = RunProcess(job, env)
    run.wait_for("suite| suite-started", timeout=500)
    run_id = run.run_id()
    frozen = sshd.session_tree_pids()
    assert frozen, "the run's ssh session should be below our sshd"
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        code, result = run.finish(timeout=240)
        took = time.monotonic() - started
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert code in (3, 4), run.stderr[-4000:]
    assert result["status"] in ("timeout", "error")
    assert took < 200, f"the run took {took:.0f}s after the freeze"
    assert result["teardown_verified"] is True, run.stderr[-4000:]
    assert wait_no_processes(run_id, timeout=20) == [], processes_of(run_id)


@pytest.mark.timeout(600)
def test_ssh_job_in_a_container_on_the_host(tmp_path, ssh_job, docker_engine, cpu_image,
                                            docker_login_user):
    """The path aws takes, as an unprivileged login user in the docker group (as on the
    default GPU AMI): the job's image runs as a container on the machine (through its
    Docker, over SSH), with the run directory shared, and the suite runs in an image of
    its own beside it; uploads land in directories the user owns, nothing in the run
    directory ends up owned by root, and teardown removes both containers and the
    directory."""
    import pwd

    login = docker_login_user
    job, env = ssh_job({"suite": {"image": "ephemera/cpu:latest",
                                  "command": "test -f /.dockerenv && echo suite-in-a-container; "
                                             "echo \"suite-uid=$(id -u)\"; grep NoNewPrivs /proc/self/status; "
                                             "cd suites/cpu-smoke && python3 -m pytest -q -p no:cacheprovider "
                                             "--junitxml=junit.xml"}})
    uid = pwd.getpwnam(login.server.user).pw_uid
    run = RunProcess(job, env)
    owners: set[int] = set()
    run.wait_for("suite| suite-in-a-container", timeout=500)
    workroot = Path(yaml_workroot(job))
    for path in workroot.rglob("*"):
        owners.add(path.lstat().st_uid)
    code, result = run.finish(timeout=560)
    assert code == 0, run.stderr[-4000:]
    assert result["status"] == "passed"
    assert owners == {uid}, f"files in the run directory owned by uids {owners}, not only {uid}"
    artifacts = Path(result["artifacts_dir"])
    assert 'tests="5"' in (artifacts / "junit.xml").read_text()
    suite_log = (artifacts / "suite.log").read_text()
    assert "suite-in-a-container" in suite_log and f"suite-uid={uid}" in suite_log
    assert re.search(r"NoNewPrivs:\s+1", suite_log), "the suite's container may gain privileges"
    import docker

    client = docker.from_env()
    try:
        left = client.containers.list(all=True, filters={"label": f"dev.ephemera.run-id={result['run_id']}"})
    finally:
        client.close()
    assert left == []
    assert not (workroot / result["run_id"]).exists()


@pytest.mark.timeout(300)
def test_login_user_without_docker_access_is_told_so(tmp_path, ssh_job, docker_engine,
                                                     nodocker_login_user):
    """A login user that may not use Docker (and has no passwordless sudo): the run stops
    before the image, says which user and what to do, and leaves nothing behind."""
    job, env = ssh_job(login=nodocker_login_user)
    run = RunProcess(job, env)
    code, result = run.finish(timeout=240)
    assert code == 2, run.stderr[-4000:]
    assert result["status"] == "error"
    assert f"login user '{nodocker_login_user.server.user}'" in result["message"]
    assert "cannot use Docker" in result["message"]
    assert "usermod -aG docker" in result["message"]
    assert result["teardown_verified"] is True
    assert not (Path(yaml_workroot(job)) / result["run_id"]).exists()


def yaml_workroot(job: Path) -> str:
    from ruamel.yaml import YAML

    return YAML(typ="safe").load(job.read_text())["resources"]["ssh"]["workroot"]
