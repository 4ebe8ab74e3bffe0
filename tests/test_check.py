"""``ephemera check``: one line per provider saying whether it can run here and why not,
against real components: a Docker engine (and a socket nobody answers on), moto for
AWS credentials and regions, botocore's Stubber for the EC2 vCPU quota codes (moto's
Service Quotas knows only VPC quotas), and the local sshd with a pinned host key."""

from __future__ import annotations

import json
import socket

import pytest

from tests.runlib import ephemera, run_env

QUOTA_CODES = ["L-3819A6DF", "L-417A185B", "L-7212CCBC", "L-DB2E81BA"]


def _check(env: dict[str, str], *args: str):
    result = ephemera("check", *args, "--json", env=env, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)["providers"]}
    return result.returncode, rows


@pytest.fixture
def dead_socket(tmp_path):
    """A unix socket file that nothing listens on any more (the engine is not touched)."""
    path = tmp_path / "dead-docker.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return path


@pytest.mark.timeout(120)
def test_docker_at_a_dead_socket_is_not_usable_and_says_where(dead_socket):
    env = run_env(DOCKER_HOST=f"unix://{dead_socket}")
    code, rows = _check(env, "--provider", "docker")
    assert code == 3
    assert rows["docker"]["usable"] is False
    assert f"unix://{dead_socket}" in rows["docker"]["detail"]
    text = ephemera("check", "--provider", "docker", env=env, timeout=60)
    assert text.returncode == 3
    assert text.stdout.startswith("docker  NO  cannot reach the Docker engine at unix://")


@pytest.mark.timeout(120)
def test_docker_engine_version_and_gpus(docker_engine):
    code, rows = _check(run_env(), "--provider", "docker")
    assert code == 0
    detail = rows["docker"]["detail"]
    assert rows["docker"]["usable"] is True
    assert detail.startswith("Docker ") and "CPUs" in detail
    assert "GPU" in detail


@pytest.mark.timeout(120)
def test_every_provider_gets_one_line_and_an_unknown_one_is_bad_input(dead_socket):
    env = run_env(DOCKER_HOST=f"unix://{dead_socket}", AWS_ACCESS_KEY_ID="",
                  AWS_SECRET_ACCESS_KEY="", AWS_CONFIG_FILE="/dev/null",
                  AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    result = ephemera("check", env=env, timeout=120)
    assert result.returncode == 0, result.stderr   # a report: other providers may not apply
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line[:1].strip()}
    assert set(lines) >= {"aws", "docker", "local", "ssh"}
    assert "  NO  " in lines["docker"] and "  ok  " in lines["local"]
    unknown = ephemera("check", "--provider", "nonesuch", env=env, timeout=60)
    assert unknown.returncode == 2 and "unknown provider 'nonesuch'" in unknown.stderr


@pytest.mark.timeout(120)
def test_aws_credentials_account_and_region_from_moto(aws_env):
    aws_env["quotas"][("us-east-1", "L-DB2E81BA")] = 8.0
    code, rows = _check(run_env(), "--provider", "aws")
    aws = rows["aws"]
    assert code == 0 and aws["usable"] is True, aws
    assert "account 123456789012" in aws["detail"] and "region us-east-1" in aws["detail"]
    quota = [line for line in aws["details"] if "L-DB2E81BA" in line]
    assert quota and quota[0].endswith(": 8 vCPUs") and "g5" in quota[0]


@pytest.mark.timeout(120)
def test_aws_without_credentials_is_not_usable(aws_env):
    env = run_env(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    env.pop("AWS_ACCESS_KEY_ID")
    env.pop("AWS_SECRET_ACCESS_KEY")
    code, rows = _check(env, "--provider", "aws")
    assert code == 3
    assert rows["aws"]["usable"] is False and "no AWS credentials" in rows["aws"]["detail"]


@pytest.mark.timeout(120)
def test_aws_refused_credentials_are_not_usable(aws_env, monkeypatch):
    """Credentials that STS refuses (here: an endpoint that answers nothing) say so."""
    from ephemera_providers.aws import AWSProvider

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    usable, detail = AWSProvider.check()
    assert usable is False and "were refused" in detail


def test_aws_quota_codes_through_stubber(aws_env):
    """The four EC2 vCPU quota codes, each read once; a code without an applied value
    falls back to the AWS default; an unreadable one says so."""
    import boto3
    from botocore.stub import Stubber
    from ephemera_providers.aws import AWSProvider

    client = boto3.client("service-quotas", region_name="us-east-1")
    values = {"L-3819A6DF": 16.0, "L-417A185B": None, "L-7212CCBC": "denied", "L-DB2E81BA": 64.0}
    with Stubber(client) as stub:
        for code in QUOTA_CODES:
            params = {"ServiceCode": "ec2", "QuotaCode": code}
            value = values[code]
            if value == "denied":
                stub.add_client_error("get_service_quota", "AccessDeniedException",
                                      expected_params=params)
            elif value is None:
                stub.add_client_error("get_service_quota", "NoSuchResourceException",
                                      expected_params=params)
                stub.add_response("get_aws_default_service_quota",
                                  {"Quota": {"QuotaCode": code, "Value": 0.0}}, params)
            else:
                stub.add_response("get_service_quota",
                                  {"Quota": {"QuotaCode": code, "Value": value}}, params)
        lines = AWSProvider.check_details(client=client)
        stub.assert_no_pending_responses()
    by_code = {line.split()[1]: line for line in lines}
    assert set(by_code) == set(QUOTA_CODES)
    assert all(line.startswith("us-east-1 ") for line in lines)
    assert by_code["L-3819A6DF"].endswith(": 16 vCPUs") and "Spot" in by_code["L-3819A6DF"]
    assert by_code["L-417A185B"].endswith(": 0 vCPUs") and "p4d" in by_code["L-417A185B"]
    assert by_code["L-7212CCBC"].endswith(": unreadable")
    assert by_code["L-DB2E81BA"].endswith(": 64 vCPUs") and "On-Demand" in by_code["L-DB2E81BA"]


def _ssh_env(sshd, host_key: str) -> dict[str, str]:
    return run_env(EPHEMERA_SSH_HOST=sshd.host, EPHEMERA_SSH_PORT=str(sshd.port),
                   EPHEMERA_SSH_USER=sshd.user, EPHEMERA_SSH_KEY=sshd.key_path,
                   EPHEMERA_SSH_HOST_KEY=host_key)


@pytest.mark.timeout(120)
def test_ssh_default_host_with_its_pinned_key(sshd):
    code, rows = _check(_ssh_env(sshd, sshd.host_key_line), "--provider", "ssh")
    assert code == 0, rows
    detail = rows["ssh"]["detail"]
    assert f"{sshd.user}@{sshd.host}:{sshd.port}" in detail
    assert "sshd answers, key accepted (pinned host key)" in detail


@pytest.mark.timeout(120)
def test_ssh_default_host_with_another_pinned_key_is_refused(sshd, tmp_path):
    import subprocess

    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    code, rows = _check(_ssh_env(sshd, wrong), "--provider", "ssh")
    assert code == 3
    assert rows["ssh"]["usable"] is False and "pinned" in rows["ssh"]["detail"]
