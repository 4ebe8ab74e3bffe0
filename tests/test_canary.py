"""A secret followed by a canary through everything a run prints and writes, on every
provider that runs here (local, docker, ssh as an unprivileged user, aws on moto).

The job's ``env`` and ``server.env`` hold the canary (substituted from the
environment). The suite prints it plain, base64-encoded and split over two writes,
and puts it in a JUnit ``system-out``; the server logs it. While the run goes, a poller
reads every process's command line on this machine: a value given only as
environment is never in one. Afterwards stdout, stderr, the --json result, the step
summary, the artifacts, the state directory and the history database hold it 0 times.
A second job uses the canary as ``${VAR}`` inside ``suite.command`` and
``server.args``: nothing ephemera prints or writes holds it either.
"""

from __future__ import annotations

import base64
import threading
import uuid
from pathlib import Path

import pytest

from tests.fixtures.standin_targets import end_vm_processes
from tests.runlib import RunProcess, edit_job

SUITE = (
    'printf "plain %s\\n" "$API_TOKEN"; '
    'printf "%s" "$API_TOKEN" | base64; '
    'printf "split %s" "$${API_TOKEN%????????}"; sleep 0.3; '
    'printf "%s\\n" "$${API_TOKEN#$${API_TOKEN%????????}}"; '
    'printf "<testsuite tests=\\"1\\"><testcase name=\\"t\\"/><system-out>%s</system-out></testsuite>" '
    '"$API_TOKEN" > ../artifacts/junit.xml; echo done'
)


class CmdlinePoller(threading.Thread):
    """Reads /proc/*/cmdline of every process, every few milliseconds."""

    def __init__(self, needle: bytes) -> None:
        super().__init__(daemon=True)
        self.needle, self.hits, self.stop = needle, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        cmdline = (entry / "cmdline").read_bytes()
                    except OSError:
                        continue
                    if self.needle in cmdline:
                        self.hits.append(cmdline.replace(b"\0", b" ")[:300])
            self.stop.wait(0.01)


def _everything_written(tmp_path: Path, run: RunProcess) -> dict[str, bytes]:
    """Every file the run wrote or printed, by name."""
    out = {"stdout": run.stdout_path.read_bytes(), "stderr": run.stderr_path.read_bytes()}
    for folder in ("runs", "state", "data"):
        for path in (tmp_path / folder).rglob("*"):
            if path.is_file() and not path.is_symlink():
                out[str(path)] = path.read_bytes()
    summary = tmp_path / "summary.md"
    out["step summary"] = summary.read_bytes() if summary.exists() else b""
    return out


@pytest.mark.parametrize("target_name", ["local_target", "docker_target", "ssh_target", "aws_target"])
@pytest.mark.timeout(300)
def test_a_canary_in_the_environment_is_never_shown_nor_in_a_command_line(request, target_name, tmp_path):
    target = request.getfixturevalue(target_name)
    canary = f"canary-{uuid.uuid4().hex}"

    def change(data) -> None:
        data["env"] = {"API_TOKEN": "${EPHEMERA_TEST_CANARY}"}
        data["server"]["env"] = {**data["server"]["env"], "HF_TOKEN": "${EPHEMERA_TEST_CANARY}",
                                 "STANDIN_ECHO_ENV": "HF_TOKEN"}
        data["suite"]["command"] = SUITE
        data["artifacts"] = []

    edit_job(target.job, change)
    env = {**target.env, "EPHEMERA_TEST_CANARY": canary, "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    poller = CmdlinePoller(canary.encode())
    poller.start()
    run = RunProcess(target.job, env, *target.args)
    try:
        code, result = run.finish(timeout=240)
    finally:
        poller.stop.set()
        poller.join(5)
    if target_name == "aws_target":
        end_vm_processes(result["run_id"] if result else run.run_id())
    assert code == 0, run.stderr[-3000:]
    assert poller.hits == [], f"the canary was in command lines: {poller.hits[:3]}"
    artifacts = Path(result["artifacts_dir"])
    suite_log = (artifacts / "suite.log").read_text()
    assert "plain ***" in suite_log and "split ***" in suite_log, suite_log
    assert "***" in (artifacts / "artifacts" / "junit.xml").read_text()
    assert "config HF_TOKEN=***" in (artifacts / "vllm.log").read_text()
    written = _everything_written(tmp_path, run)
    encoded = base64.b64encode(canary.encode())
    leaks = [name for name, data in written.items() if canary.encode() in data or encoded in data]
    assert leaks == [], f"the canary is in {leaks}"


@pytest.mark.parametrize("target_name", ["local_target", "ssh_target"])
@pytest.mark.timeout(300)
def test_a_canary_substituted_into_commands_is_masked_everywhere(request, target_name, tmp_path):
    target = request.getfixturevalue(target_name)
    canary = f"canary-{uuid.uuid4().hex}"

    def change(data) -> None:
        data["server"]["args"] = ["--api-key", "${EPHEMERA_TEST_CANARY}"]
        data["suite"]["command"] = "echo key ${EPHEMERA_TEST_CANARY}"
        data["artifacts"] = []

    edit_job(target.job, change)
    env = {**target.env, "EPHEMERA_TEST_CANARY": canary, "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    run = RunProcess(target.job, env, *target.args)
    code, result = run.finish(timeout=240)
    assert code == 0, run.stderr[-3000:]
    assert "--api-key ***" in result["server_command"] and result["suite_command"] == "echo key ***"
    written = _everything_written(tmp_path, run)
    leaks = [name for name, data in written.items() if canary.encode() in data]
    assert leaks == [], f"the canary is in {leaks}"
