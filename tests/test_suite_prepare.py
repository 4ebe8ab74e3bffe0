"""`suite.prepare`: commands that need no server, run while vLLM starts, with their own
phase, log and timeout. The server here is the small real stand-in for vLLM
(tests/standin) behind a wrapper that holds its start for a while, so the health wait
is long enough for the prepare to fail or finish inside it; a case takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from ephemera.errors import ConfigError
from ephemera.spec.jobfile import load_job
from tests.fixtures.standin_targets import Target
from tests.runlib import RunProcess

SLOW_START = 25  # seconds the server's start is held (the health wait)
PASSING_START = 8  # the same, where a 2 s prepare only has to end inside it


def _slow_server(target: Target, seconds: float = SLOW_START) -> None:
    """Hold the stand-in's start for ``seconds``: a sitecustomize in its folder (on the
    server's PYTHONPATH only) sleeps first when the server's environment asks for it."""
    data = YAML().load(target.job.read_text())
    standin = target.job.parent / "standin"
    (standin / "sitecustomize.py").write_text(
        "import os, time\n"
        "time.sleep(float(os.environ.get('STANDIN_SLOW_START', '0')))\n")
    data["server"]["env"]["STANDIN_SLOW_START"] = str(seconds)
    with target.job.open("w") as fh:
        YAML().dump(data, fh)


def _with_suite(target: Target, **suite) -> None:
    data = YAML().load(target.job.read_text())
    data["suite"].update(suite)
    with target.job.open("w") as fh:
        YAML().dump(data, fh)


def _phases(result: dict) -> dict[str, dict]:
    return {p["name"]: p for p in result["phases"]}


@pytest.fixture
def local_slow(local_target):
    _slow_server(local_target)
    return local_target


@pytest.fixture
def docker_slow(docker_target):
    _slow_server(docker_target)
    return docker_target


@pytest.mark.parametrize("target_name", ["local_slow", "docker_slow"])
@pytest.mark.timeout(240)
def test_a_prepare_failure_during_the_health_wait_stops_the_server_and_leaves_nothing(
        request, target_name):
    target: Target = request.getfixturevalue(target_name)
    _with_suite(target, prepare=["echo fetching the data set", "echo broken >&2; exit 7"],
                command="echo suite-started")
    run = RunProcess(target.job, target.env, *target.args)
    code, result = run.finish(timeout=200)
    assert code == 3, run.stderr[-3000:]
    assert result["status"] == "error"
    assert "suite.prepare failed (exit status 7); the server was stopped" in result["message"]
    assert "broken" in result["message"]  # the log's last lines
    phases = _phases(result)
    assert phases["prepare"]["ok"] is False and phases["health"]["ok"] is False
    assert "suite" not in phases
    # It failed inside the health wait, long before the server would have answered.
    assert phases["prepare"]["start"] < phases["health"]["start"] + 1.0
    assert phases["health"]["seconds"] < SLOW_START - 5
    assert "suite-started" not in run.stderr
    log = Path(result["artifacts_dir"]) / "suite-prepare.log"
    assert log.read_text().splitlines() == ["fetching the data set", "broken"]
    assert result["teardown_verified"] is True
    assert target.leftovers(result["run_id"]) == []


@pytest.mark.timeout(240)
def test_a_passing_prepare_runs_during_the_health_wait_before_the_suite(local_target):
    target = local_target
    _slow_server(target, PASSING_START)
    _with_suite(target, prepare=["sleep 2", "echo ready > prepared.txt"],
                setup=["test -f prepared.txt"], command="cat prepared.txt")
    run = RunProcess(target.job, target.env, *target.args)
    code, result = run.finish(timeout=200)
    assert code == 0, run.stderr[-3000:]
    phases = _phases(result)
    prepare, health, suite = phases["prepare"], phases["health"], phases["suite"]
    assert prepare["ok"] and health["ok"] and suite["ok"]
    # Started with the server, ended inside the health wait, before the suite.
    assert phases["server_start"]["start"] <= prepare["start"] <= health["start"] + 1.0
    assert prepare["start"] + prepare["seconds"] < health["start"] + health["seconds"]
    assert prepare["start"] + prepare["seconds"] <= suite["start"]
    assert 2.0 <= prepare["seconds"] < PASSING_START
    assert "ready" in (Path(result["artifacts_dir"]) / "suite.log").read_text()
    assert "where the time went:" in run.stderr
    assert target.leftovers(result["run_id"]) == []


@pytest.mark.timeout(240)
def test_a_prepare_that_outlasts_its_timeout_is_stopped(local_slow):
    target = local_slow
    _with_suite(target, prepare=["echo started; sleep 120"], prepare_timeout="3s",
                command="echo suite-started")
    run = RunProcess(target.job, target.env, *target.args)
    code, result = run.finish(timeout=200)
    assert code == 4, run.stderr[-3000:]
    assert result["status"] == "timeout"
    assert "phase 'prepare' ran out after 3s" in result["message"]
    phases = _phases(result)
    assert phases["prepare"]["ok"] is False and 3.0 <= phases["prepare"]["seconds"] < 10.0
    assert (Path(result["artifacts_dir"]) / "suite-prepare.log").read_text() == "started\n"
    assert target.leftovers(result["run_id"]) == []


def _job_file(tmp_path: Path, suite: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"name": "prep", "model": {"id": "ephemera/tiny-llama"},
                                "image": "ephemera/cpu", "suite": suite,
                                "resources": {"provider": "local"}}, indent=1))
    return path


def test_prepare_and_its_timeout_are_read_from_the_job_file(tmp_path):
    job = load_job(_job_file(tmp_path, {"command": "pytest", "prepare": ["pip install x", "sleep 1"],
                                        "prepare_timeout": "5m"})).job
    assert job.suite.prepare == ["pip install x", "sleep 1"]
    assert job.suite.prepare_timeout == 300.0
    assert load_job(_job_file(tmp_path, {"command": "pytest"})).job.suite.prepare == []


def test_an_empty_prepare_command_is_refused_naming_the_field_and_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_job(_job_file(tmp_path, {"command": "pytest", "prepare": ["sleep 1", "  "]}))
    text = str(caught.value)
    assert "suite.prepare: command 2 is empty" in text
    assert f"{tmp_path / 'job.yaml'}:" in text


def test_a_prepare_timeout_of_zero_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_job(_job_file(tmp_path, {"command": "pytest", "prepare": ["sleep 1"],
                                      "prepare_timeout": "0s"}))
    assert "suite.prepare_timeout" in str(caught.value)

