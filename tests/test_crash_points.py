"""Never leak: ephemera killed (SIGKILL) at every step of a run, and each provider call
and state write failing once, on every provider that runs here (local, docker, ssh as
an unprivileged user, aws on moto). After each case ``ephemera down --all`` must leave
nothing: no process, container, run directory, instance, security group, key pair or
key file.

The step is chosen by EPHEMERA_FAULT (ephemera/faults.py), not by sleeping and
hoping. vLLM itself is not the point here, so the server is a small real stand-in
that answers /health at once (tests/standin); a case takes seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.runlib import (
    KeyInstaller,
    RunProcess,
    ephemera,
    processes_of,
    run_env,
    wait_no_processes,
    write_job,
)

STANDIN = Path(__file__).parent / "standin"

# Where SIGKILL lands, in the order a run reaches them.
KILL_POINTS = ["state-launching", "provider.launch", "state-active", "boot", "health", "suite",
               "collect", "teardown", "provider.terminate", "terminated", "report"]
# Calls and writes that fail once (after doing their work: a lost reply).
RAISE_POINTS = ["provider.launch", "provider.poll", "provider.connect", "provider.terminate",
                "provider.find", "state-launching", "state-active", "state-tearing-down"]


@dataclass
class Target:
    """One provider's job, environment, extra CLI arguments and leftover check."""

    job: Path
    env: dict[str, str]
    args: tuple[str, ...]
    leftovers: Callable[[str], list[str]]
    after: Callable[[], None] = lambda: None


def _job(tmp_path: Path, provider: str, *, image: str = "host", python: str = "/usr/bin/python3",
         resources: dict | None = None) -> Path:
    standin = tmp_path / "standin"
    if not standin.exists():
        shutil.copytree(STANDIN, standin)
    return write_job(tmp_path, "local-cpu-smoke.yaml", {
        "name": f"crash-{provider}",
        "image": image,
        "server": {"launcher": "api_server", "python": python, "args": [],
                   "env": {"PYTHONPATH": "suite/standin"}, "health_timeout": "1m"},
        "suite": {"files": ["standin"], "command": "echo suite-started", "timeout": "1m"},
        "artifacts": [],
        "resources": {"provider": provider, **(resources or {})},
        "timeout": "5m",
    })


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state"), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                   EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"),
                   EPHEMERA_CONFIG=str(tmp_path / "none.toml"), **extra)


def _processes(run_id: str) -> list[str]:
    return [f"process {pid}: {cmd}" for pid, cmd in wait_no_processes(run_id, timeout=5)]


def _keys(tmp_path: Path, run_id: str) -> list[str]:
    keys = tmp_path / "state" / "keys" / run_id
    return [f"key files {keys}"] if keys.exists() and any(keys.iterdir()) else []


def _containers(run_id: str) -> list[str]:
    import docker

    client = docker.from_env()
    try:
        return [f"container {c.name}" for c in client.containers.list(
            all=True, filters={"label": f"dev.ephemera.run-id={run_id}"})]
    finally:
        client.close()


@pytest.fixture
def local_target(tmp_path):
    def leftovers(run_id: str) -> list[str]:
        workdir = tmp_path / "state" / "local" / run_id
        return _processes(run_id) + ([f"directory {workdir}"] if workdir.exists() else [])

    return Target(_job(tmp_path, "local", python=sys.executable), _env(tmp_path), (), leftovers)


@pytest.fixture
def docker_target(tmp_path, docker_engine, cpu_image):
    def leftovers(run_id: str) -> list[str]:
        return _containers(run_id) + _processes(run_id) + _keys(tmp_path, run_id)

    job = _job(tmp_path, "docker", image="ephemera/cpu", python="python3",
               resources={"docker": {"network": "host"}})
    return Target(job, _env(tmp_path), (), leftovers)


@pytest.fixture
def ssh_target(tmp_path, docker_login_user):
    login = docker_login_user
    workroot = Path(login.workroot("crash"))
    server = login.server
    job = _job(tmp_path, "ssh", resources={"ssh": {
        "host": server.host, "port": server.port, "user": server.user, "key": server.key_path,
        "workroot": str(workroot)}})

    def leftovers(run_id: str) -> list[str]:
        workdir = workroot / run_id
        return _processes(run_id) + ([f"directory {workdir}"] if workdir.exists() else [])

    yield Target(job, _env(tmp_path), (), leftovers)
    shutil.rmtree(workroot, ignore_errors=True)


@pytest.fixture
def aws_target(tmp_path, aws_env, docker_login_user):
    import boto3

    login = docker_login_user
    workroot = login.workroot("crash-aws")
    authorized = login.home / ".ssh" / "authorized_keys"
    before = authorized.read_text()
    installer = KeyInstaller(tmp_path / "state", authorized)
    installer.start()
    catalog = tmp_path / "cpu-catalog.csv"
    catalog.write_text("provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,"
                       "price_per_hour\naws,c7i.xlarge,us-west-2,,0,0,4,8,0.1785\n")
    job = _job(tmp_path, "aws", resources={"regions": ["us-west-2"],
                                           "aws": {"ssh_user": login.server.user}})

    def leftovers(run_id: str) -> list[str]:
        out = _keys(tmp_path, run_id)
        for region in ("us-west-2", "us-east-1"):
            ec2 = boto3.client("ec2", region_name=region)
            out += [f"security group {g['GroupName']}" for g in ec2.describe_security_groups()["SecurityGroups"]
                    if g["GroupName"] != "default"]
            out += [f"key pair {k['KeyName']}" for k in ec2.describe_key_pairs()["KeyPairs"]]
            out += [f"instance {i['InstanceId']} ({i['State']['Name']})"
                    for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
                    if i["State"]["Name"] not in ("terminated", "shutting-down")]
        return out

    def after() -> None:
        # The "VM" is this machine: what terminating it would end, the test ends.
        installer.stop.set()
        installer.join(timeout=5)
        authorized.write_text(before)
        shutil.rmtree(workroot, ignore_errors=True)

    env = _env(tmp_path, EPHEMERA_SSH_WORKROOT=workroot)
    yield Target(job, env, ("--catalog", str(catalog)), leftovers, after)
    after()


TARGETS = ["local_target", "docker_target", "ssh_target", "aws_target"]


def _run_with_fault(target: Target, fault: str) -> tuple[int, dict | None, str, str]:
    run = RunProcess(target.job, {**target.env, "EPHEMERA_FAULT": fault}, *target.args)
    code, result = run.finish(timeout=240)
    run_id = result["run_id"] if result else run.run_id()
    return code, result, run.stderr, run_id


def _end_vm_processes(run_id: str) -> None:
    """For aws only: the instance is gone in moto, the processes on this stand-in VM are
    not; end them as a terminated VM would."""
    for pid, _ in processes_of(run_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.timeout(900)
def test_sigkill_at_every_step_then_down_leaves_nothing(request, target_name):
    target: Target = request.getfixturevalue(target_name)
    failures = []
    for point in KILL_POINTS:
        code, result, stderr, run_id = _run_with_fault(target, point)
        if code != -signal.SIGKILL:
            failures.append(f"{point}: expected the run to die by SIGKILL, exit {code}: {stderr[-1500:]}")
            continue
        down = ephemera("down", "--all", "--json", env=target.env, timeout=240)
        if down.returncode != 0:
            failures.append(f"{point}: down --all exited {down.returncode}: {down.stderr[-1500:]}")
        if target_name == "aws_target":
            _end_vm_processes(run_id)
        left = target.leftovers(run_id)
        if left:
            failures.append(f"{point}: left after down --all: {left}; down said: {down.stderr[-800:]}")
    assert failures == [], "\n".join(failures)


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.timeout(900)
def test_each_call_and_state_write_failing_once_leaves_nothing(request, target_name):
    target: Target = request.getfixturevalue(target_name)
    failures = []
    for point in RAISE_POINTS:
        code, result, stderr, run_id = _run_with_fault(target, f"{point}@raise")
        if code < 0 or "Traceback" in stderr or "internal error" in stderr:
            failures.append(f"{point}: the run crashed (exit {code}): {stderr[-1500:]}")
        elif result is not None and result["status"] == "passed" and point == "provider.launch":
            failures.append(f"{point}: a launch whose reply was lost cannot pass")
        down = ephemera("down", "--all", "--json", env=target.env, timeout=240)
        if down.returncode != 0:
            failures.append(f"{point}: down --all exited {down.returncode}: {down.stderr[-1500:]}")
        if target_name == "aws_target":
            _end_vm_processes(run_id)
        left = target.leftovers(run_id)
        if left:
            failures.append(f"{point}: left after the run and down --all: {left}")
        if result is not None and result.get("teardown_verified") and left:
            failures.append(f"{point}: teardown said verified while {left} remained")
    assert failures == [], "\n".join(failures)


def test_fault_points_are_named_in_the_module():
    """Every point the tests use is documented where a reader looks for it."""
    from ephemera import faults

    doc = faults.__doc__ or ""
    for point in {*KILL_POINTS, *RAISE_POINTS}:
        assert point in doc, f"{point} is not documented in ephemera/faults.py"


@pytest.mark.timeout(300)
def test_sigint_with_a_frozen_peer_terminates_the_instance_at_once(aws_target, sshd):
    """A cancelled CI job sends SIGINT and kills the step about 10 s later. With the SSH
    peer frozen (SIGSTOP on its sshd session: the connection stays up and nothing
    answers), TerminateInstances must still go out at once. The benchmark
    benchmarks/bench_sigint.py measures the time; this checks it stays under 9 s."""
    import time

    import boto3
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(aws_target.job.read_text())
    data["suite"]["command"] = "echo suite-started; sleep 600"
    with aws_target.job.open("w") as fh:
        yaml.dump(data, fh)
    run = RunProcess(aws_target.job, aws_target.env, *aws_target.args)
    run.wait_for("suite| suite-started", timeout=120)
    run_id = run.run_id()
    frozen = sshd.session_tree_pids()
    assert frozen, "the run's SSH session should be below the test sshd"
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    ec2 = boto3.client("ec2", region_name="us-west-2")
    filters = [{"Name": "tag:ephemera:run-id", "Values": [run_id]}]
    try:
        sent = time.monotonic()
        run.signal(signal.SIGINT)
        ended = None
        while time.monotonic() - sent < 60:
            states = [i["State"]["Name"] for r in ec2.describe_instances(Filters=filters)["Reservations"]
                      for i in r["Instances"]]
            if states and all(s in ("shutting-down", "terminated") for s in states):
                ended = time.monotonic() - sent
                break
            time.sleep(0.05)
        code, result = run.finish(timeout=120)
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        _end_vm_processes(run_id)
    assert ended is not None, f"the instance was not terminated within 60 s of SIGINT:\n{run.stderr[-3000:]}"
    print(f"sigint-to-terminate-seconds {ended:.3f}")   # read by benchmarks/bench_sigint.py
    assert ended < 9, f"TerminateInstances went out {ended:.1f}s after SIGINT:\n{run.stderr[-3000:]}"
    assert code == 130 and result["status"] == "interrupted", run.stderr[-3000:]
    assert aws_target.leftovers(run_id) == []
