"""The suite stage: its environment (the server's URL, the model, the artifacts
directory), its command, and running it in the job's image or its own.
"""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING

from ephemera.lifecycle.faults import fault_point
from ephemera.transport.container import ContainerRemote
from ephemera.transport.remote import Remote

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run


def suite_env(run: Run) -> dict[str, str]:
    assert run.server_cmd is not None
    return {
        **run.job.env, **run.job.suite.env,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{run.server_cmd.port}/v1",
        "OPENAI_API_KEY": run.job.suite.env.get("OPENAI_API_KEY", "EMPTY"),
        "EPHEMERA_MODEL": run.server_cmd.served_name,
        "EPHEMERA_ARTIFACTS": f"{run.workdir}/artifacts",
        "EPHEMERA_RUN_ID": run.run_id,
    }


def suite_command(run: Run) -> str:
    parts = [*run.job.suite.setup, run.job.suite.command]
    return " && ".join(f"( {p} )" if len(parts) > 1 else p for p in parts)


def suite_place(run: Run, command: str, name: str) -> tuple[Remote, str, str | None, str]:
    """Where a command of the suite runs: (channel, command, cwd, docker command). In the
    job's image (or on the machine) as it is; with ``suite.image`` as a sibling container
    ``ephemera-<run id>-<name>`` on the machine's Docker, sharing the run directory and
    the host network (so the server is on 127.0.0.1)."""
    assert run.remote is not None
    cwd = f"{run.workdir}/suite"
    if not run.job.suite.image:
        return run.remote, command, cwd, ""
    container = run.remote if isinstance(run.remote, ContainerRemote) else None
    env = run.suite_env()
    names = " ".join(f"-e {k}" for k in env)
    wd = shlex.quote(run.workdir)
    docker = container.docker_for(env) if container else "docker"
    user = container.user_flags() if container else ""
    network = container.sibling_flags() if container else "--network host "
    command = (f"{docker} run --rm --name ephemera-{run.run_id}-{name} {network}"
               "--security-opt no-new-privileges "
               f"--label dev.ephemera.run-id={run.run_id} {user}{names} -v {wd}:{wd} "
               f"-w {shlex.quote(cwd)} --entrypoint sh {shlex.quote(run.job.suite.image)} "
               f"-c {shlex.quote(command)}")
    return run._host_remote(), command, None, docker


def run_suite(run: Run) -> int:
    assert run.remote is not None
    deadline, seconds, by_job = run.phase_deadline("suite", run.job.suite.timeout)
    run.artifacts_dir.mkdir(parents=True, exist_ok=True)
    remote, command, cwd, docker = suite_place(run, run.suite_command(), "suite")
    with run.phase("suite", run.job.suite.command):
        with run.reporter.group(f"suite output ({run.job.suite.command})"):
            result = remote.run(
                run._with_path(command), env=run.suite_env(), cwd=cwd,
                timeout=max(1.0, deadline - time.monotonic()),
                on_line=run._suite_line,
                log_path=run.artifacts_dir / "suite.log")
        if run.job.suite.image and result.timed_out:
            remote.run(f"{docker} rm -f ephemera-{run.run_id}-suite >/dev/null 2>&1; true", timeout=30)
        if result.timed_out:
            raise run._timeout_error("suite", seconds, by_job,
                                      f"the suite was stopped; its output is in {run.artifacts_dir / 'suite.log'}")
        run._log(f"suite exited with status {result.exit_status}")
        return result.exit_status if result.exit_status is not None else 1


def suite_line(run: Run, line: str) -> None:
    run.reporter.line(run._redact(line), "suite")
    fault_point("suite")
