"""Never leak: ephemera killed (SIGKILL) at every step of a run, and each provider call
and state write failing once, on every provider that runs here (local, docker, ssh as
an unprivileged user, aws on moto). After each case ``ephemera down --all`` must leave
nothing: no process, container, run directory, instance, security group, key pair or
key file.

The step is chosen by EPHEMERA_FAULT (ephemera/lifecycle/faults.py), not by sleeping and
hoping. vLLM itself is not the point here, so the server is a small real stand-in
that answers /health at once (tests/standin); a case takes seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from tests.fixtures.standin_targets import Target, end_vm_processes
from tests.runlib import RunProcess, ephemera

# Where SIGKILL lands, in the order a run reaches them.
KILL_POINTS = ["state-launching", "provider.launch", "state-active", "boot", "health", "suite",
               "collect", "teardown", "provider.terminate", "terminated", "report"]
# Calls and writes that fail once (after doing their work: a lost reply).
RAISE_POINTS = ["provider.launch", "provider.poll", "provider.connect", "provider.terminate",
                "provider.find", "state-launching", "state-active", "state-tearing-down"]


TARGETS = ["local_target", "docker_target", "ssh_target", "aws_target"]


def _run_with_fault(target: Target, fault: str) -> tuple[int, dict | None, str, str]:
    run = RunProcess(target.job, {**target.env, "EPHEMERA_FAULT": fault}, *target.args)
    code, result = run.finish(timeout=240)
    run_id = result["run_id"] if result else run.run_id()
    return code, result, run.stderr, run_id


def _down_all_leaves_nothing(target: Target, target_name: str, point: str, run_id: str) -> list[str]:
    """`ephemera down --all`, then what of the run is left: the failures to report."""
    failures = []
    down = ephemera("down", "--all", "--json", env=target.env, timeout=240)
    if down.returncode != 0:
        failures.append(f"{point}: down --all exited {down.returncode}: {down.stderr[-1500:]}")
    if target_name == "aws_target":
        end_vm_processes(run_id)
    left = target.leftovers(run_id)
    if left:
        failures.append(f"{point}: left after down --all: {left}; down said: {down.stderr[-800:]}")
    return failures


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
        failures += _down_all_leaves_nothing(target, target_name, point, run_id)
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
        left_after = _down_all_leaves_nothing(target, target_name, point, run_id)
        failures += left_after
        if result is not None and result.get("teardown_verified") and left_after:
            failures.append(f"{point}: teardown said verified while something remained")
    assert failures == [], "\n".join(failures)


def test_fault_points_are_named_in_the_module():
    """Every point the tests use is documented where a reader looks for it."""
    from ephemera.lifecycle import faults

    doc = faults.__doc__ or ""
    for point in {*KILL_POINTS, *RAISE_POINTS}:
        assert point in doc, f"{point} is not documented in ephemera/lifecycle/faults.py"


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
        end_vm_processes(run_id)
    assert ended is not None, f"the instance was not terminated within 60 s of SIGINT:\n{run.stderr[-3000:]}"
    print(f"sigint-to-terminate-seconds {ended:.3f}")   # read by benchmarks/bench_sigint.py
    assert ended < 9, f"TerminateInstances went out {ended:.1f}s after SIGINT:\n{run.stderr[-3000:]}"
    assert code == 130 and result["status"] == "interrupted", run.stderr[-3000:]
    assert aws_target.leftovers(run_id) == []


# ---------------------------------------------------------------------- ephemera bake

# Where SIGKILL lands in a bake run (aws on moto): its run's steps, then the bake's own
# (documented in ephemera/cli/bake.py), then its teardown.
BAKE_KILL_POINTS = ["state-launching", "provider.launch", "state-active", "boot", "health",
                    "bake.clean", "bake.stopped", "bake.image", "teardown", "terminated"]
BAKE_RAISE_POINTS = ["provider.launch", "provider.poll", "bake.clean", "bake.stopped", "bake.image"]


class BakeProcess(RunProcess):
    """`ephemera bake JOB --json` in its own process group."""

    def __init__(self, job, env, *args: str) -> None:
        import subprocess

        from tests.runlib import EPHEMERA

        self.stdout_path = job.parent / f"{job.stem}.bake.stdout"
        self.stderr_path = job.parent / f"{job.stem}.bake.stderr"
        self._out = self.stdout_path.open("w")
        self._err = self.stderr_path.open("w")
        self.proc = subprocess.Popen([*EPHEMERA, "bake", str(job), "--json", *args],
                                     stdout=self._out, stderr=self._err, env=env,
                                     cwd=job.parent, start_new_session=True)


def _bake_with_fault(target: Target, fault: str) -> tuple[int, dict | None, str, str]:
    run = BakeProcess(target.job, {**target.env, "EPHEMERA_FAULT": fault}, *target.args)
    code, result = run.finish(timeout=240)
    return code, result, run.stderr, run.run_id()


def _images_left_after_prune(target: Target, point: str) -> list[str]:
    """A bake cut short leaves no image that a plan would boot (only complete ones are),
    and `bake --prune` removes the unfinished ones with their snapshots."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-west-2")
    failures = []
    for image in ec2.describe_images(Owners=["self"])["Images"]:
        tags = {t["Key"]: t["Value"] for t in image.get("Tags", [])}
        if tags.get("ephemera:baked") == "complete" and point in BAKE_KILL_POINTS[:8]:
            failures.append(f"{point}: image {image['ImageId']} marked complete by a cut-short bake")
    pruned = ephemera("bake", "--prune", "--all", "--region", "us-west-2", env=target.env)
    if pruned.returncode != 0:
        failures.append(f"{point}: bake --prune exited {pruned.returncode}: {pruned.stderr[-800:]}")
    snapshots = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
                 if "CreateImage" in s.get("Description", "")}
    left = [i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]]
    if left or snapshots:
        failures.append(f"{point}: left after bake --prune --all: {left} {sorted(snapshots)}")
    return failures


@pytest.mark.timeout(900)
def test_bake_killed_at_every_step_then_down_leaves_nothing(aws_target):
    failures = []
    for point in BAKE_KILL_POINTS:
        code, result, stderr, run_id = _bake_with_fault(aws_target, point)
        if code != -signal.SIGKILL:
            failures.append(f"{point}: expected the bake to die by SIGKILL, exit {code}: {stderr[-1500:]}")
            continue
        failures += _down_all_leaves_nothing(aws_target, "aws_target", point, run_id)
        failures += _images_left_after_prune(aws_target, point)
    assert failures == [], "\n".join(failures)


@pytest.mark.timeout(900)
def test_bake_steps_failing_once_leave_nothing_and_no_image(aws_target):
    failures = []
    for point in BAKE_RAISE_POINTS:
        code, result, stderr, run_id = _bake_with_fault(aws_target, f"{point}@raise")
        if code < 0 or "Traceback" in stderr or "internal error" in stderr:
            failures.append(f"{point}: the bake crashed (exit {code}): {stderr[-1500:]}")
        elif point.startswith("bake.") and (code == 0 or (result or {}).get("image")):
            failures.append(f"{point}: a failed bake step cannot give an image (exit {code})")
        failures += _down_all_leaves_nothing(aws_target, "aws_target", point, run_id)
        failures += _images_left_after_prune(aws_target, point)
    assert failures == [], "\n".join(failures)


def test_bake_fault_points_are_named_where_the_bake_is():
    from ephemera.cli import bake

    for point in {*BAKE_KILL_POINTS, *BAKE_RAISE_POINTS} - {*KILL_POINTS, *RAISE_POINTS}:
        assert point in (bake.__doc__ or ""), f"{point} is not documented in ephemera/cli/bake.py"
