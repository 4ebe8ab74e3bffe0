"""The ``local`` provider on this machine: launch, exec, copy both ways, terminate,
and the dead-man switch when ephemera itself is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ephemera_providers.local import LocalProvider, nvidia_offers

from ephemera.errors import ConfigError, RemoteCommandError
from ephemera.provider import InstanceState, OfferRequest
from tests.fixtures.common import process_alive, wait_process_gone


def test_offers_describe_this_machine():
    offers = LocalProvider().offers(OfferRequest())
    assert len(offers) == 1
    offer = offers[0]
    assert offer.provider == "local" and offer.price_per_hour == 0.0
    assert offer.memory_gib > 1 and offer.vcpus == os.cpu_count()
    if offer.gpu_count == 0:
        assert offer.cpu_only and offer.gpu is None


def test_nvidia_smi_output_becomes_one_offer_for_the_whole_machine():
    text = "NVIDIA L4, 23034\nNVIDIA L4, 23034\n"
    (offer,) = nvidia_offers("local", "local-gpu", text, vcpus=16, memory_gib=64.0)
    assert offer.gpu == "NVIDIA L4" and offer.gpu_count == 2
    assert offer.gpu_memory_gib == pytest.approx(22.49, abs=0.01)
    assert nvidia_offers("local", "x", "", 1, 1.0) == []


@pytest.mark.timeout(120)
def test_launch_exec_copy_and_terminate(contract_local, tmp_path):
    provider = contract_local.provider
    spec = contract_local.make_spec("local-life-1")
    instance = provider.launch(spec)
    workdir = Path(instance.workdir)
    assert workdir.is_dir() and workdir.parent == Path(os.environ["EPHEMERA_STATE_DIR"]) / "local"
    assert provider.launch(spec).id == instance.id
    assert provider.poll(instance).state == InstanceState.READY
    remote = provider.connect(instance)

    lines: list[str] = []
    log = tmp_path / "run.log"
    result = remote.run('echo "pwd=$(pwd)"; echo "tok=$TOKEN" >&2; exit 4',
                        env={"TOKEN": "hidden-token-1"}, on_line=lines.append,
                        log_path=log, timeout=30)
    assert result.exit_status == 4
    assert f"pwd={workdir}" in lines and "tok=***" in lines
    assert "hidden-token-1" not in log.read_text()

    src = tmp_path / "suite"
    (src / "data").mkdir(parents=True)
    (src / "data" / "x.txt").write_text("x")
    remote.put(src, "suite")
    assert (workdir / "suite" / "data" / "x.txt").read_text() == "x"
    assert remote.run("cat suite/data/x.txt > results.xml; echo y > other.log",
                      timeout=30).ok
    back = tmp_path / "back"
    assert remote.get("results.xml", back) == [back / "results.xml"]
    assert [p.name for p in remote.get("*.log", back)] == ["other.log"]
    assert remote.get("missing.txt", back) == []
    assert sorted(p.name for p in remote.get("suite", back)) == ["x.txt"]

    handle = remote.start("sleep 300", log_file="server.log", env={"API_TOKEN": "tok-on-env-only"})
    assert remote.is_running(handle)
    # The secret reaches the process through its environment, never its command line.
    assert b"API_TOKEN=tok-on-env-only" in Path(f"/proc/{handle}/environ").read_bytes()
    assert b"tok-on-env-only" not in Path(f"/proc/{handle}/cmdline").read_bytes()
    assert remote.forward(8123) == 8123
    recorded = (workdir / ".pgids").read_text().split()
    assert handle in recorded

    provider.terminate(instance)
    assert wait_process_gone(int(handle), 5), "terminate left a process of the run running"
    assert not workdir.exists()
    assert provider.poll(instance).state == InstanceState.TERMINATED
    provider.terminate(instance)
    with pytest.raises(RemoteCommandError, match="does not exist"):
        provider.connect(instance)


@pytest.mark.timeout(60)
def test_run_timeout_kills_the_whole_group(contract_local, tmp_path):
    provider = contract_local.provider
    instance = provider.launch(contract_local.make_spec("local-timeout-1"))
    try:
        remote = provider.connect(instance)
        started = time.monotonic()
        result = remote.run("sleep 200 & echo $! > child.pid; wait", timeout=1.5)
        assert result.timed_out and result.exit_status is None
        assert time.monotonic() - started < 5
        child = int((Path(instance.workdir) / "child.pid").read_text())
        assert wait_process_gone(child, 5)
        silent = remote.run("sleep 30", timeout=1)   # no output at all: deadline still holds
        assert silent.timed_out
    finally:
        provider.terminate(instance)


def test_bad_run_id_is_refused():
    from ephemera.provider import LaunchSpec, Offer

    offer = Offer("local", "local-cpu", None, None, 0, 0.0, 1, 1.0, 0.0)
    spec = LaunchSpec(run_id="../escape", job_name="j", offer=offer, image="host",
                      labels={}, expires_at=datetime.now(UTC))
    with pytest.raises(ConfigError, match="run id '../escape'"):
        LocalProvider().launch(spec)


CHILD = r"""
import json, os, signal, sys
from datetime import UTC, datetime, timedelta
from ephemera.provider import LaunchSpec, Offer, make_labels
from ephemera_providers.local import LocalProvider

expires = datetime.now(UTC) + timedelta(seconds=float(sys.argv[2]))
offer = Offer("local", "local-cpu", None, None, 0, 0.0, 1, 1.0, 0.0)
spec = LaunchSpec(run_id=sys.argv[1], job_name="deadman", offer=offer, image="host",
                  labels=make_labels(sys.argv[1], "deadman", "t", expires), expires_at=expires)
provider = LocalProvider()
inst = provider.launch(spec)
remote = provider.connect(inst)
handle = remote.start("sleep 300", log_file="server.log")
print(json.dumps({"workdir": inst.workdir, "pgid": handle}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(60)
def test_killed_ephemera_leaves_an_instance_that_ends_itself_at_expiry():
    proc = subprocess.run([sys.executable, "-c", CHILD, "local-deadman-1", "4"],
                          capture_output=True, text=True, timeout=30, env=os.environ.copy())
    assert proc.returncode == -9, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    pgid, workdir = int(facts["pgid"]), Path(facts["workdir"])
    assert process_alive(pgid) and workdir.is_dir(), "the run should outlive the killed process"
    deadline = time.monotonic() + 20
    while (workdir.exists() or process_alive(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workdir.exists(), "the watchdog did not remove the run directory"
    assert not process_alive(pgid), "the watchdog did not kill the run's processes"
    assert LocalProvider().find({"run-id": "local-deadman-1"}) == []


def test_labels_file_carries_prefixed_labels(contract_local):
    provider = contract_local.provider
    instance = provider.launch(contract_local.make_spec("local-labels-1"))
    try:
        record = json.loads((Path(instance.workdir) / "labels.json").read_text())
        assert record["labels"]["ephemera.run-id"] == "local-labels-1"
        assert set(instance.labels) >= {"run-id", "job", "owner", "expires-at"}
        expires = datetime.fromisoformat(instance.labels["expires-at"].replace("Z", "+00:00"))
        assert expires - datetime.now(UTC) < timedelta(seconds=601)
    finally:
        provider.terminate(instance)


def _bystander() -> subprocess.Popen:
    """A process in its own session that no run started (like another user's job)."""
    return subprocess.Popen(["sleep", "300"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _start_run_processes(remote, workdir: Path) -> tuple[int, int]:
    """A detached server (group leader alive) and a group whose leader already exited,
    leaving a member behind. Returns (server pgid, orphaned member pid)."""
    server = int(remote.start("sleep 300", log_file="server.log"))
    assert remote.run("sleep 300 > /dev/null 2>&1 & echo $! > member.pid", timeout=30).ok
    member = int((workdir / "member.pid").read_text())
    assert process_alive(server) and process_alive(member)
    return server, member


def _poison_pgids(workdir: Path, bystander: int) -> None:
    with open(workdir / ".pgids", "a", encoding="utf-8") as fh:
        fh.write(f"-1\n0\n1\nabc\n$(touch {workdir.parent}/pwned)\n 99999999999999999999\n"
                 f"{bystander}\n")


@pytest.mark.timeout(60)
def test_terminate_kills_only_process_groups_that_belong_to_the_run(contract_local):
    provider = contract_local.provider
    instance = provider.launch(contract_local.make_spec("local-owned-1"))
    workdir = Path(instance.workdir)
    bystander = _bystander()
    try:
        remote = provider.connect(instance)
        server, member = _start_run_processes(remote, workdir)
        assert b"EPHEMERA_RUN_ID=local-owned-1" in Path(f"/proc/{server}/environ").read_bytes()
        _poison_pgids(workdir, bystander.pid)
        provider.terminate(instance)
        assert wait_process_gone(server, 5) and wait_process_gone(member, 5)
        assert not workdir.exists()
        assert bystander.poll() is None, "terminate killed a process the run did not start"
        assert not (workdir.parent / "pwned").exists()
    finally:
        bystander.kill()
        bystander.wait()
        provider.terminate(instance)


@pytest.mark.timeout(60)
def test_watchdog_kills_only_process_groups_that_belong_to_the_run(contract_local):
    provider = contract_local.provider
    instance = provider.launch(contract_local.make_spec("local-owned-2", expires_in_seconds=3))
    workdir = Path(instance.workdir)
    bystander = _bystander()
    try:
        remote = provider.connect(instance)
        server, member = _start_run_processes(remote, workdir)
        _poison_pgids(workdir, bystander.pid)
        deadline = time.monotonic() + 20
        while workdir.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not workdir.exists(), "the watchdog did not end the run at its expiry"
        assert wait_process_gone(server, 5) and wait_process_gone(member, 5)
        assert bystander.poll() is None, "the watchdog killed a process the run did not start"
    finally:
        bystander.kill()
        bystander.wait()
        provider.terminate(instance)


@pytest.mark.timeout(60)
def test_a_recycled_pid_in_the_record_is_left_alone(contract_local):
    """The run's server ended long ago and its pid now belongs to someone else."""
    provider = contract_local.provider
    instance = provider.launch(contract_local.make_spec("local-owned-3"))
    workdir = Path(instance.workdir)
    bystander = _bystander()
    try:
        (workdir / ".pgids").write_text(f"{bystander.pid}\n")
        provider.terminate(instance)
        assert not workdir.exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_cleanup_never_removes_a_directory_that_is_not_a_run(tmp_path):
    """What terminate runs on this machine and over SSH: a directory without the marks of
    a launch (.pgids, labels.json) is someone else's and stays; an empty one is removed."""
    from ephemera_providers._deadman import cleanup_script

    foreign = tmp_path / "home" / "some-user"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    result = subprocess.run(["sh", "-c", cleanup_script(str(foreign))], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode != 0 and "not a run directory" in result.stderr
    assert (foreign / "thesis.tex").read_text() == "years of work"

    empty = tmp_path / "home" / "run-cut-short"
    empty.mkdir()
    assert subprocess.run(["sh", "-c", cleanup_script(str(empty))], timeout=30).returncode == 0
    assert not empty.exists()
    with pytest.raises(ConfigError, match="does not belong to run"):
        cleanup_script(str(foreign), "another-run")
