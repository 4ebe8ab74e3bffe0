"""Running the job's image on a machine (aws, ssh): one long-lived container per run,
started through the machine's Docker with the GPUs, host networking and the run's
working directory mounted at the same path; commands then go through
``docker exec``. Files move through the machine itself (the directory is shared).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from ephemera.errors import ConfigError, RemoteCommandError
from ephemera.remote import CommandResult, LineSink, Remote, ShellRemote


class ContainerRemote(ShellRemote):
    def __init__(self, host: Remote, name: str, workdir: str, run_id: str = "") -> None:
        self.host = host
        self.name = name
        self.workdir = workdir
        self.run_id = run_id

    def start_container(self, image: str, *, gpus: int, lifetime_seconds: int, shm_size: str = "1g",
                        timeout: float = 900) -> None:
        """Start the run's container. Its main process sleeps for ``lifetime_seconds`` (up
        to the run's expiry) and ``--rm`` removes it then: a dead-man switch of its own."""
        gpu_flag = "--gpus all " if gpus > 0 else ""
        cmd = (f"docker rm -f {self.name} >/dev/null 2>&1; "
               f"docker run -d --rm --name {self.name} {gpu_flag}--network host --ipc host "
               f"--shm-size {shm_size} -v {shlex.quote(self.workdir)}:{shlex.quote(self.workdir)} "
               f"--label dev.ephemera.run-id={shlex.quote(self.run_id)} "
               f"--entrypoint sleep {shlex.quote(image)} {max(1, int(lifetime_seconds))}")
        result = self.host.run(cmd, timeout=timeout)
        if not result.ok:
            tail = result.output_tail[-800:]
            if "No such image" in tail or "pull access denied" in tail or "not found" in tail:
                raise ConfigError(f"image '{image}' cannot be run on the instance: {tail.strip()}")
            raise RemoteCommandError(f"could not start the job's image '{image}' on the instance: {tail.strip()}",
                                     exit_status=result.exit_status, output_tail=tail)

    def remove_container(self) -> None:
        self.host.run(f"docker rm -f {self.name} >/dev/null 2>&1; true", timeout=60)

    def run(self, command: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, on_line: LineSink | None = None,
            log_path: Path | None = None) -> CommandResult:
        # Values stay in the host-side environment; docker exec copies them by name.
        names = " ".join(f"-e {k}" for k in (env or {}))
        workdir = f"-w {shlex.quote(cwd)} " if cwd else ""
        outer = f"docker exec {names} {workdir}{self.name} sh -c {shlex.quote(command)}"
        return self.host.run(outer, env=env, timeout=timeout, on_line=on_line, log_path=log_path)

    def put(self, local: Path, remote: str, *, timeout: float | None = None) -> None:
        self.host.put(local, remote, timeout=timeout)

    def get(self, remote: str, local: Path, *, timeout: float | None = None) -> list[Path]:
        return self.host.get(remote, local, timeout=timeout)

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        return self.host.forward(remote_port, remote_host)  # host networking

    def close(self) -> None:
        self.host.close()
