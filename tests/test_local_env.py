"""The local provider hands its commands a clean environment: the job's variables, what
a shell and the server need, and the names the env_allow setting lists; never this
machine's cloud keys, CI tokens or OIDC request variables."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ephemera_providers.local import LocalRemote

from ephemera.errors import ConfigError
from ephemera.spec.settings import get_settings, reset_settings

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-canary-5f2d9c",
    "GITHUB_TOKEN": "ghs-canary-81be4a",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc-canary-77aa01",
    "ACTIONS_ID_TOKEN_REQUEST_URL": "https://oidc.example.invalid/canary-3c3c",
}


@pytest.fixture
def leaky_environ(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EXTRA_ALLOWED", "allowed-value-1")
    monkeypatch.setenv("NOT_ALLOWED", "not-allowed-value-2")
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("EPHEMERA_ENV_ALLOW", "EXTRA_ALLOWED, OTHER_NAME")
    reset_settings()


def _parse(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.split("\0") if "=" in line)


def _check(env: dict[str, str], home: str) -> None:
    for name in SECRETS:
        assert name not in env, f"{name} reached the run's command"
    assert not any(value in "\0".join(env.values()) for value in SECRETS.values())
    assert "NOT_ALLOWED" not in env and "PYTHONPATH" not in env
    assert env["PATH"] and env["HOME"] == home
    assert env["JOB_VAR"] == "from-the-job"
    assert env["EXTRA_ALLOWED"] == "allowed-value-1"
    assert env["EPHEMERA_RUN_ID"] == "env-run-1"


@pytest.mark.timeout(60)
def test_a_command_sees_only_the_clean_environment(tmp_path, leaky_environ):
    import os

    remote = LocalRemote(tmp_path / "env-run-1", tmp_path / "env-run-1" / ".pgids")
    (tmp_path / "env-run-1").mkdir()
    result = remote.run("env -0 > seen.env", env={"JOB_VAR": "from-the-job"}, timeout=30)
    assert result.ok
    _check(_parse((tmp_path / "env-run-1" / "seen.env").read_text()), os.environ["HOME"])


@pytest.mark.timeout(60)
def test_a_detached_start_sees_only_the_clean_environment(tmp_path, leaky_environ):
    import os

    workdir = tmp_path / "env-run-1"
    workdir.mkdir()
    remote = LocalRemote(workdir, workdir / ".pgids")
    handle = remote.start("exec sleep 30", env={"JOB_VAR": "from-the-job"}, log_file="s.log")
    try:
        environ = Path(f"/proc/{handle}/environ")
        deadline = time.monotonic() + 10
        # The group leader execs sleep; read its environment once it is sleep.
        while "sleep" not in Path(f"/proc/{handle}/cmdline").read_text() \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        _check(_parse(environ.read_text()), os.environ["HOME"])
    finally:
        remote.stop(handle, grace=1)


def test_env_allow_reads_a_json_list_or_comma_separated_names(monkeypatch):
    monkeypatch.setenv("EPHEMERA_ENV_ALLOW", '["A_B", "C"]')
    reset_settings()
    assert get_settings().env_allow == ["A_B", "C"]
    monkeypatch.setenv("EPHEMERA_ENV_ALLOW", "A_B,C ,")
    reset_settings()
    assert get_settings().env_allow == ["A_B", "C"]
    monkeypatch.setenv("EPHEMERA_ENV_ALLOW", "A=B")
    reset_settings()
    with pytest.raises(ConfigError, match="EPHEMERA_ENV_ALLOW"):
        get_settings()
