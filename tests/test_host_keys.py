"""Host keys: a host is trusted only when known_hosts, a configured key or fingerprint,
or (on AWS) the instance's console output vouches for it; first-use trust is opt-in.

Against the real sshd of the test session (its key is in the session's known_hosts)
and the moto server; the console text is what cloud-init prints on a real instance."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ephemera.provider import InstanceState
from ephemera.spec.settings import reset_settings
from ephemera.transport.hostkeys import (
    HostKeyChangedError,
    HostKeyUnknownError,
    accepted_entries,
    fingerprint,
    keys_from_console,
)
from ephemera.transport.ssh import HostKeyPin, Target, connect, generate_keypair
from ephemera.transport.ssh_remote import SSHRemote
from tests.runlib import ephemera

pytestmark = pytest.mark.timeout(120)


def keygen_fingerprint(pub_path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(pub_path)], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[1]


def host_pub(sshd):
    return sshd.log_path.parent / "host_ed25519.pub"


@pytest.fixture
def empty_known_hosts(tmp_path, monkeypatch):
    path = tmp_path / "known_hosts"
    path.write_text("")
    monkeypatch.setenv("EPHEMERA_SSH_KNOWN_HOSTS", str(path))
    reset_settings()
    return path


@pytest.fixture
def target(sshd):
    return Target(host=sshd.host, port=sshd.port, user=sshd.user, key_path=sshd.key_path)


def keyscan(sshd, hashed: bool = False) -> str:
    args = ["ssh-keyscan", "-t", "ed25519", "-p", str(sshd.port)] + (["-H"] if hashed else [])
    return subprocess.run([*args, sshd.host], capture_output=True, text=True, check=True,
                          timeout=20).stdout


def test_fingerprint_is_openssh_s(sshd):
    blob = sshd.host_key_line.split()[1]
    assert fingerprint(blob) == keygen_fingerprint(host_pub(sshd))


def test_unknown_host_refused_with_its_fingerprint_then_known(sshd, target, empty_known_hosts):
    started = time.monotonic()
    with pytest.raises(HostKeyUnknownError) as caught:
        connect(target, deadline=20)
    assert time.monotonic() - started < 5, "an unknown host key must not be retried"
    text = str(caught.value)
    assert keygen_fingerprint(host_pub(sshd)) in text
    assert f"ssh-keyscan -p {sshd.port} {sshd.host}" in text
    # What the hint says to do: add the host's key to known_hosts (hashed names too).
    empty_known_hosts.write_text(keyscan(sshd, hashed=True))
    client = connect(target, deadline=20)
    client.close()


def test_known_hosts_with_another_key_is_a_changed_key(sshd, target, empty_known_hosts, tmp_path):
    _, other = generate_keypair(tmp_path / "other")
    empty_known_hosts.write_text(f"[{sshd.host}]:{sshd.port} {' '.join(other.split()[:2])}\n")
    with pytest.raises(HostKeyChangedError, match="not the key .*known_hosts"):
        connect(target, deadline=20)


def test_configured_fingerprint_pins_without_known_hosts(sshd, target, empty_known_hosts):
    good = keygen_fingerprint(host_pub(sshd))
    pin = HostKeyPin(good)
    connect(target, deadline=20, pin=pin).close()
    assert pin.line.split()[:2] == sshd.host_key_line.split()[:2]   # the full key is kept
    bad = "SHA256:" + "A" * 43
    with pytest.raises(HostKeyChangedError, match="changed"):
        connect(target, deadline=20, pin=HostKeyPin(bad))


def test_first_use_trust_is_opt_in(sshd, target, empty_known_hosts, monkeypatch):
    monkeypatch.setenv("EPHEMERA_SSH_TRUST_FIRST_USE", "1")
    reset_settings()
    pin = HostKeyPin()
    connect(target, deadline=20, pin=pin).close()
    assert pin.line.split()[:2] == sshd.host_key_line.split()[:2]


@pytest.mark.parametrize("entry", ["ssh-ed25519", "ssh-ed25519 not*base64", "SHA256:a b"])
def test_malformed_configured_key_is_a_config_error(entry):
    from ephemera.errors import ConfigError

    with pytest.raises(ConfigError, match="host key"):
        accepted_entries(entry)


def cloud_init_console(key_line: str) -> str:
    """The end of a real instance's console output as cloud-init writes it."""
    return "\n".join([
        "[   12.345678] cloud-init[1021]: Cloud-init v. 24.4 running 'modules:config'",
        "<14>Nov 30 12:00:01 cloud-init: #############################################################",
        "<14>Nov 30 12:00:01 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----",
        "<14>Nov 30 12:00:01 cloud-init: 256 SHA256:abc root@ip-10-0-0-1 (ED25519)",
        "<14>Nov 30 12:00:01 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----",
        "-----BEGIN SSH HOST KEY KEYS-----",
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY= root@ip-10-0-0-1",
        f"{key_line} root@ip-10-0-0-1",
        "-----END SSH HOST KEY KEYS-----",
        "[   13.000000] cloud-init[1021]: Cloud-init v. 24.4 finished",
    ])


def test_console_keys_are_read_between_cloud_init_markers(sshd):
    keys = keys_from_console(cloud_init_console(sshd.host_key_line))
    assert keys[-1] == sshd.host_key_line
    assert len(keys) == 2
    assert keys_from_console("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAA") == []


def answer_console(provider, region, console: str) -> None:
    """moto answers GetConsoleOutput with a fixed text; this puts cloud-init's in its place
    on the provider's own client, as a real instance's console would read."""
    def after(parsed, **_):
        parsed["Output"] = console

    provider.client("ec2", region).meta.events.register(
        "after-call.ec2.GetConsoleOutput", after)


def test_aws_pins_the_key_from_the_console_before_login(contract_aws, empty_known_hosts, tmp_path):
    aws, sshd = contract_aws, contract_aws.sshd
    answer_console(aws.provider, "us-east-1", cloud_init_console(sshd.host_key_line))
    inst = aws.provider.launch(aws.make_spec("run-console"))
    try:
        ready = aws.provider.poll(inst)
        assert ready.state is InstanceState.READY
        assert sshd.host_key_line in ready.endpoint.host_key.splitlines()
        # known_hosts is empty: only the console's key lets the login through.
        remote = SSHRemote.from_endpoint(ready.endpoint, connect_timeout=20)
        try:
            assert remote.run("echo pinned", timeout=20).output_tail.strip() == "pinned"
        finally:
            remote.close()
    finally:
        aws.provider.terminate(inst)


def test_aws_console_with_another_key_refuses_the_login(contract_aws, empty_known_hosts, tmp_path):
    aws = contract_aws
    _, other = generate_keypair(tmp_path / "other")
    answer_console(aws.provider, "us-east-1", cloud_init_console(" ".join(other.split()[:2])))
    inst = aws.provider.launch(aws.make_spec("run-console-bad"))
    try:
        ready = aws.provider.poll(inst)
        remote = SSHRemote.from_endpoint(ready.endpoint, connect_timeout=20)
        with pytest.raises(HostKeyChangedError):
            remote.run("true", timeout=20)
        remote.close()
    finally:
        aws.provider.terminate(inst)


def test_aws_waits_for_the_console_keys(contract_aws, monkeypatch):
    from ephemera_providers.aws import AWSProvider

    monkeypatch.setenv("EPHEMERA_AWS_HOST_KEY_WAIT", "600")
    reset_settings()
    provider = AWSProvider()
    inst = provider.launch(contract_aws.make_spec("run-console-wait"))
    try:
        polled = provider.poll(inst)
        assert polled.state is InstanceState.RUNNING
        assert "host keys in the console output" in polled.message
    finally:
        provider.terminate(inst)


def test_ssh_job_refused_for_unknown_host_then_passes(ssh_target, tmp_path):
    """The ssh provider end to end (stand-in server): an unknown host key stops the run
    before anything is made on the host, with the fingerprint; once known, it passes."""
    ssh = _ssh_section(ssh_target)
    scanned = subprocess.run(["ssh-keyscan", "-t", "ed25519", "-p", str(ssh["port"]), ssh["host"]],
                             capture_output=True, text=True, check=True, timeout=20).stdout
    shown = subprocess.run(["ssh-keygen", "-lf", "-"], input=scanned, capture_output=True,
                           text=True, check=True).stdout.split()[1]
    known = tmp_path / "job_known_hosts"
    known.write_text("")
    env = {**ssh_target.env, "EPHEMERA_SSH_KNOWN_HOSTS": str(known)}
    env.pop("EPHEMERA_SSH_TRUST_FIRST_USE", None)
    refused = ephemera("run", str(ssh_target.job), *ssh_target.args, env=env, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert shown in refused.stderr
    assert "known_hosts" in refused.stderr
    workroot = Path(ssh["workroot"])
    assert not workroot.exists() or not any(workroot.iterdir()), "a refused host got a run dir"
    known.write_text(scanned)
    passed = ephemera("run", str(ssh_target.job), *ssh_target.args, env=env, timeout=300)
    assert passed.returncode == 0, passed.stderr[-3000:]
    run_ids = [p.name for p in (tmp_path / "runs").iterdir()]
    assert run_ids and all(ssh_target.leftovers(r) == [] for r in run_ids)


def _ssh_section(target) -> dict:
    from ruamel.yaml import YAML

    return dict(YAML(typ="safe").load(target.job.read_text())["resources"]["ssh"])


def test_no_test_reads_the_machine_s_own_known_hosts():
    assert os.environ["EPHEMERA_SSH_KNOWN_HOSTS"].endswith("known_hosts")
    assert not os.environ["EPHEMERA_SSH_KNOWN_HOSTS"].startswith(os.path.expanduser("~/.ssh"))
