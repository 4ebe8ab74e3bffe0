"""The ``ssh`` provider against a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ephemera_providers.ssh import SSHProvider

from ephemera.errors import ConfigError
from ephemera.provider import Instance, InstanceState, OfferRequest
from ephemera.transport.ssh import HostKeyChangedError
from tests.fixtures.common import process_alive, wait_process_gone

pytestmark = pytest.mark.sshd




@pytest.mark.timeout(60)
def test_offers_from_the_host(ssh_options):
    (offer,) = SSHProvider(target=ssh_options).offers(OfferRequest())
    assert offer.provider == "ssh" and offer.instance_type == "ssh:127.0.0.1"
    assert offer.vcpus == os.cpu_count() and offer.memory_gib > 1
    assert offer.price_per_hour == 0.0
    if offer.gpu_count == 0:   # this machine has no nvidia-smi
        assert offer.gpu is None


def test_declared_gpus_become_the_offer(ssh_options):
    target = {**ssh_options, "gpus": [{"name": "L40S", "memory_gib": 44.4, "count": 4}]}
    (offer,) = SSHProvider(target=target).offers(OfferRequest())
    assert (offer.gpu, offer.gpu_count, offer.gpu_memory_gib) == ("L40S", 4, 44.4)
    with pytest.raises(ConfigError, match="resources.ssh.gpus"):
        SSHProvider(target={**ssh_options, "gpus": [{"count": 1}]}).offers(OfferRequest())


def test_missing_host_names_the_setting(contract_ssh):
    spec = contract_ssh.make_spec("ssh-nohost-1")
    spec = type(spec)(**{**spec.__dict__, "options": {}})
    with pytest.raises(ConfigError, match="resources.ssh.host"):
        SSHProvider().launch(spec)
    bad = type(spec)(**{**spec.__dict__, "options": {"host": "127.0.0.1", "workroot": "tmp/x"}})
    with pytest.raises(ConfigError, match="resources.ssh.workroot"):
        SSHProvider().launch(bad)


@pytest.mark.timeout(120)
def test_launch_exec_copy_terminate_touches_nothing_else(contract_ssh, sshd, tmp_path):
    provider = contract_ssh.provider
    spec = contract_ssh.make_spec("ssh-life-1")
    instance = provider.launch(spec)
    assert instance.state == InstanceState.READY
    assert instance.endpoint.host_key.split()[:2] == sshd.host_key_line.split()[:2]
    workdir = Path(instance.workdir)
    assert workdir.is_dir() and (workdir / "labels.json").is_file()

    # A process on the host that the run did not start must survive terminate.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        # Terminate from "another process": only the serialised instance, no target.
        stored = Instance.from_dict(json.loads(json.dumps(instance.to_dict())))
        remote = SSHProvider().connect(stored)
        src = tmp_path / "suite"
        src.mkdir()
        (src / "test_x.py").write_text("print('ok')\n")
        remote.put(src, str(workdir / "suite"), timeout=30)
        result = remote.run("python3 suite/test_x.py > out.txt; echo done",
                            cwd=str(workdir), timeout=30)
        assert result.ok and result.output_tail.strip() == "done"
        got = remote.get(str(workdir / "out.txt"), tmp_path / "back", timeout=30)
        assert got == [tmp_path / "back" / "out.txt"] and got[0].read_text() == "ok\n"
        handle = remote.start("sleep 300", cwd=str(workdir), log_file=str(workdir / "s.log"))
        orphan = remote.run("setsid sleep 301 > /dev/null 2>&1 < /dev/null & echo $!; "
                            "sleep 302 > /dev/null 2>&1 & echo $!", cwd=str(workdir), timeout=30)
        escaped, background = (int(x) for x in orphan.output_tail.split()[-2:])
        remote.close()

        SSHProvider().terminate(stored)
        assert wait_process_gone(int(handle), 5), "a process group the run started survived"
        assert wait_process_gone(background, 5), "a background child of a run command survived"
        assert not workdir.exists()
        assert process_alive(bystander.pid), "terminate killed a process the run did not start"
        assert SSHProvider().poll(stored).state == InstanceState.TERMINATED
        SSHProvider().terminate(stored)
    finally:
        bystander.kill()
        bystander.wait()
        if "escaped" in locals() and process_alive(escaped):
            os.kill(escaped, 9)   # started its own session on purpose: out of the run's reach


@pytest.mark.timeout(60)
def test_changed_host_key_is_refused(contract_ssh, tmp_path):
    from ephemera.transport.ssh import generate_keypair

    provider = contract_ssh.provider
    instance = provider.launch(contract_ssh.make_spec("ssh-pin-1"))
    try:
        _, other = generate_keypair(tmp_path / "k")
        forged = instance.evolve(data={**instance.data, "host_key": other})
        with pytest.raises(HostKeyChangedError):
            provider.connect(forged).run("true", timeout=10)
    finally:
        provider.terminate(instance)


CHILD = r"""
import json, os, signal, sys
from datetime import UTC, datetime, timedelta
from ephemera.provider import LaunchSpec, Offer, make_labels
from ephemera_providers.ssh import SSHProvider

options = json.loads(sys.argv[3])
expires = datetime.now(UTC) + timedelta(seconds=float(sys.argv[2]))
offer = Offer("ssh", "ssh:x", None, None, 0, 0.0, 1, 1.0, 0.0)
spec = LaunchSpec(run_id=sys.argv[1], job_name="deadman", offer=offer, image="host",
                  labels=make_labels(sys.argv[1], "deadman", "t", expires), expires_at=expires,
                  options=options)
provider = SSHProvider()
inst = provider.launch(spec)
remote = provider.connect(inst)
handle = remote.start("sleep 300", log_file=inst.workdir + "/server.log")
print(json.dumps({"workdir": inst.workdir, "pgid": handle}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(60)
def test_killed_ephemera_leaves_a_run_that_ends_itself_at_expiry(ssh_options):
    proc = subprocess.run([sys.executable, "-c", CHILD, "ssh-deadman-1", "5",
                           json.dumps(ssh_options)],
                          capture_output=True, text=True, timeout=40, env=os.environ.copy())
    assert proc.returncode == -9, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    pgid, workdir = int(facts["pgid"]), Path(facts["workdir"])
    assert process_alive(pgid) and workdir.is_dir()
    deadline = time.monotonic() + 25
    while (workdir.exists() or process_alive(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not workdir.exists(), "the remote watchdog did not remove the run directory"
    assert not process_alive(pgid), "the remote watchdog did not kill the run's processes"
    assert SSHProvider(target=ssh_options).find({"run-id": "ssh-deadman-1"}) == []


@pytest.mark.timeout(120)
def test_root_owned_leftovers_end_the_teardown_once(docker_login_user, caplog):
    """As an unprivileged login user: files that root wrote into the run directory cannot
    be removed by the user. Teardown kills the run's processes, says once what is left,
    and ends at once, verified, instead of retrying the removal for minutes."""
    import logging
    import shutil

    from ephemera.lifecycle.teardown import teardown_run
    from ephemera.provider import LaunchSpec, Offer, make_labels

    login = docker_login_user.server
    workroot = docker_login_user.workroot("leftover")
    options = {"host": login.host, "port": login.port, "user": login.user, "key": login.key_path,
               "workroot": workroot}
    from datetime import UTC, datetime, timedelta

    expires = datetime.now(UTC) + timedelta(minutes=10)
    offer = Offer(provider="ssh", instance_type="cpu", region=None, gpu=None, gpu_count=0,
                  gpu_memory_gib=0.0, vcpus=1, memory_gib=1.0, price_per_hour=0.0)
    spec = LaunchSpec(run_id="ssh-rootfiles-1", job_name="contract", offer=offer, image="host",
                      labels=make_labels("ssh-rootfiles-1", "contract", "tester", expires),
                      expires_at=expires, options=options)
    provider = SSHProvider(target=options)
    instance = provider.launch(spec)
    workdir = Path(instance.workdir)
    handle = provider.connect(instance).start("sleep 300", log_file=f"{workdir}/logs/s.log")
    # What a container running as root leaves in the shared directory.
    (workdir / "root-owned").mkdir()
    (workdir / "root-owned" / "vllm.log").write_text("written by root")
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            result = teardown_run(provider, instance.run_id, instance, timeout=120, log=lambda m: None)
        took = time.monotonic() - started
        assert result.verified, result.problems
        assert took < 20, f"teardown held the run {took:.0f}s over files it cannot remove"
        assert wait_process_gone(int(handle), 5), "the run's process survived the teardown"
        warnings = [r.getMessage() for r in caplog.records if "could not be removed" in r.getMessage()]
        assert len(warnings) == 1 and str(workdir) in warnings[0]
        assert not (workdir / "labels.json").exists()
    finally:
        shutil.rmtree(workroot, ignore_errors=True)


@pytest.mark.timeout(60)
def test_every_command_of_a_run_carries_its_run_id(contract_ssh):
    """Cleanup kills only process groups whose processes carry the run's id: every
    command on the channel, detached ones included, has it in its environment."""
    provider = contract_ssh.provider
    instance = provider.launch(contract_ssh.make_spec("ssh-runid-1"))
    try:
        remote = provider.connect(instance)
        assert remote.run('test "$EPHEMERA_RUN_ID" = ssh-runid-1', timeout=30).ok
        handle = remote.start("exec sleep 300", log_file=f"{instance.workdir}/s.log")
        environ = Path(f"/proc/{handle}/environ").read_bytes().split(b"\0")
        assert b"EPHEMERA_RUN_ID=ssh-runid-1" in environ
    finally:
        provider.terminate(instance)
