"""Helpers for end-to-end run tests: write a job file, start `ephemera run` as a real
subprocess (so signals are real), wait for a phase, and look for leftovers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
EPHEMERA = [sys.executable, "-m", "ephemera"]


def deep_update(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def write_job(directory: Path, template: str, changes: dict[str, Any] | None = None,
              drop: tuple[str, ...] = ("tiers",)) -> Path:
    """A copy of jobs/<template> (with its suite files) in ``directory``, changed."""
    yaml = YAML()
    data = yaml.load((JOBS / template).read_text())
    data = json.loads(json.dumps(data))  # plain dicts
    for key in drop:
        data.pop(key, None)
    deep_update(data, changes or {})
    suites = directory / "suites"
    if not suites.exists():
        shutil.copytree(JOBS / "suites", suites)
    path = directory / f"{data['name']}.yaml"
    with path.open("w") as fh:
        yaml.dump(data, fh)
    return path


def edit_job(job: Path, change: Callable[[Any], None]) -> None:
    """Rewrite a job file in place through ``change`` (given the loaded YAML)."""
    yaml = YAML()
    data = yaml.load(job.read_text())
    change(data)
    with job.open("w") as fh:
        yaml.dump(data, fh)


class RunProcess:
    """`ephemera run JOB --json` in its own process group, like a CI step."""

    def __init__(self, job: Path, env: dict[str, str], *args: str, cwd: Path | None = None) -> None:
        logs = cwd or job.parent  # never next to a job file in the repository
        self.stdout_path = logs / f"{job.stem}.stdout"
        self.stderr_path = logs / f"{job.stem}.stderr"
        self._out = self.stdout_path.open("w")
        self._err = self.stderr_path.open("w")
        self.proc = subprocess.Popen([*EPHEMERA, "run", str(job), "--json", *args],
                                     stdout=self._out, stderr=self._err, env=env,
                                     cwd=cwd or job.parent, start_new_session=True)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"run exited ({self.proc.returncode}) before '{text}':\n{self.stderr[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"'{text}' not seen within {timeout}s:\n{self.stderr[-3000:]}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float) -> tuple[int, dict[str, Any] | None]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
            self._err.close()
        text = self.stdout_path.read_text()
        return code, (json.loads(text) if text.strip() else None)

    def run_id(self) -> str:
        for line in self.stderr.splitlines():
            if "] run " in line and ": job " in line:
                return line.split("] run ", 1)[1].split(":", 1)[0]
        raise AssertionError("no run id in the output yet")


def processes_of(run_id: str) -> list[tuple[int, str]]:
    """Processes on this machine whose command line or working directory names the run."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        try:   # the run's commands carry its id in their environment
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            environ = []
        if run_id in cmdline or run_id in cwd or f"EPHEMERA_RUN_ID={run_id}".encode() in environ:
            found.append((int(entry), cmdline[:200]))
    return found


def wait_no_processes(run_id: str, timeout: float = 10.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    left = processes_of(run_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = processes_of(run_id)
    return left


def ephemera(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*EPHEMERA, *args], env=env, capture_output=True, text=True, timeout=timeout)


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GITHUB_ACTIONS", None)
    env.pop("GITHUB_STEP_SUMMARY", None)
    env.update(extra)
    return env


SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "HUP": signal.SIGHUP, "KILL": signal.SIGKILL}


class KeyInstaller(threading.Thread):
    """Plays cloud-init's part: puts the run's public key into the sshd's authorized keys
    as soon as the run has made it, and records the key pair moto was given."""

    def __init__(self, state_dir: Path, authorized: Path) -> None:
        super().__init__(daemon=True)
        self.state_dir, self.authorized = state_dir, authorized
        self.stop = threading.Event()
        self.installed: list[str] = []
        self.key_pairs: dict[str, str] = {}

    def run(self) -> None:
        import boto3

        ec2 = boto3.client("ec2", region_name="us-west-2")
        while not self.stop.wait(0.05):
            for pub in self.state_dir.glob("keys/*/*.pub"):
                line = pub.read_text().strip()
                if line and line not in self.installed:
                    with self.authorized.open("a") as fh:
                        fh.write(line + "\n")
                    self.installed.append(line)
            if self.installed and not self.key_pairs:
                for key in ec2.describe_key_pairs(IncludePublicKey=True)["KeyPairs"]:
                    self.key_pairs[key["KeyName"]] = key.get("PublicKey", "")


def known_hosts_file(tmp_path_factory) -> Path:
    """The test session's known_hosts (``EPHEMERA_SSH_KNOWN_HOSTS`` of every test): the
    machine's own ~/.ssh/known_hosts is never read, and only the servers the tests
    start are listed in it."""
    path = tmp_path_factory.getbasetemp() / "known_hosts"
    path.touch(exist_ok=True)
    return path
