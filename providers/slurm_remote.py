"""How the ``slurm`` provider reaches its cluster: Slurm's own tools run here or on a
login node over SSH (:class:`SlurmTools`), and the channel to a held allocation
(:class:`SlurmRemote`), whose commands run on the job's node through
``srun --jobid=ID --overlap`` and whose files go through the file system that the
login side and the nodes share.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ephemera_providers.local import LocalRemote

from ephemera.errors import ConfigError, InfraError
from ephemera.spec.settings import get_settings
from ephemera.transport.remote import CommandResult, LineSink, Remote, ShellRemote

TOOL_TIMEOUT = 60.0
# Slurm's own variables that must reach the tools (where the cluster's config is).
SLURM_ENV_NAMES = ("SLURM_CONF",)
# Marks the tool's stderr and exit status in the output of a command run over SSH.
ERR_MARK = "@@ephemera-err "
RC_MARK = "@@ephemera-rc "


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stdout: str
    stderr: str

    def why(self) -> str:
        return (self.stderr.strip() or self.stdout.strip())[-800:] or f"exit status {self.returncode}"


def login_target(spec: str, key: str | None):  # noqa: ANN201 - ephemera.transport.ssh.Target
    """``user@host[:port]`` of the login node as an SSH target."""
    from ephemera.transport.ssh import Target

    user, _, rest = spec.rpartition("@")
    host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()) or any(c.isspace() for c in spec):
        raise ConfigError(f"slurm_login_host '{spec}' is not user@host[:port]")
    return Target(host=host, port=int(port or 22), user=user or "root", key_path=key)


class LoginShell(LocalRemote):
    """This machine as the login side: commands also see Slurm's own variables."""

    @staticmethod
    def _base_env() -> dict[str, str]:
        env = LocalRemote._base_env()
        env.update({k: os.environ[k] for k in SLURM_ENV_NAMES if os.environ.get(k)})
        return env


class SlurmTools:
    """Runs Slurm's commands (sbatch, squeue, sinfo, scancel, srun) on this machine or,
    with a login host, on that machine over the SSH layer."""

    def __init__(self, login_host: str | None = None) -> None:
        self.login_host = login_host
        self._ssh: Remote | None = None

    @property
    def where(self) -> str:
        return self.login_host or "this machine"

    def shell(self, run_id: str | None = None) -> Remote:
        """The channel to the login side (this machine, or the login host over SSH); with
        ``run_id`` its commands carry EPHEMERA_RUN_ID."""
        if self.login_host is None:
            return LoginShell(run_id=run_id)
        if self._ssh is None:
            from ephemera.transport.ssh import HostKeyPin
            from ephemera.transport.ssh_remote import SSHRemote

            settings = get_settings()
            target = login_target(self.login_host, str(settings.ssh_key) if settings.ssh_key else None)
            self._ssh = SSHRemote(target, pin=HostKeyPin(settings.ssh_host_key),
                                  connect_timeout=TOOL_TIMEOUT, op_timeout=TOOL_TIMEOUT)
        return self._ssh

    def run(self, argv: list[str], timeout: float = TOOL_TIMEOUT) -> ToolResult:
        if self.login_host is None:
            try:
                conf = get_settings().slurm_conf
                out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                     stdin=subprocess.DEVNULL,
                                     env={**os.environ, "SLURM_CONF": conf} if conf else None)
            except FileNotFoundError:
                raise InfraError(f"{argv[0]} is not installed on this machine: the slurm provider "
                                 "needs Slurm's client tools (or set slurm_login_host)") from None
            except subprocess.TimeoutExpired:
                raise InfraError(f"{argv[0]} did not answer within {timeout:.0f}s") from None
            return ToolResult(out.returncode, out.stdout, out.stderr)
        return self._run_remote(argv, timeout)

    def _run_remote(self, argv: list[str], timeout: float) -> ToolResult:
        lines: list[str] = []
        # stdout as it is; stderr marked line by line; the tool's status on a line of its own.
        # fd 3 is the channel's stdout, set on the outer group so that it is not the pipe;
        # the status goes on a line of its own even after output without a last newline.
        line = (f"{{ {{ {shlex.join(argv)} 2>&1 1>&3 3>&-; printf '\\n{RC_MARK}%s\\n' \"$?\" >&3; }} "
                f"| sed 's/^/{ERR_MARK}/'; }} 3>&1")
        conf = get_settings().slurm_conf
        result = self.shell().run(line, timeout=timeout, on_line=lines.append,
                                  env={"SLURM_CONF": conf} if conf else None)
        if result.timed_out:
            raise InfraError(f"{argv[0]} on {self.login_host} did not answer within {timeout:.0f}s")
        out, err, code = [], [], None
        for text in lines:
            if text.startswith(ERR_MARK):
                err.append(text[len(ERR_MARK):])
            elif text.startswith(RC_MARK) and text[len(RC_MARK):].strip().isdigit():
                code = int(text[len(RC_MARK):])
            else:
                out.append(text)
        if code is None:
            raise InfraError(f"could not run {argv[0]} on {self.login_host}: "
                             f"{result.output_tail.strip()[-300:]}")
        return ToolResult(code, "\n".join(out) + "\n", "\n".join(err))

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None


def srun_prefix(job_id: str) -> str:
    """Run one task on the job's node inside its allocation, beside its other steps."""
    if not job_id.isdigit():
        raise ConfigError(f"'{job_id}' is not a Slurm job id")
    return f"srun --jobid={job_id} --overlap --nodes=1 --ntasks=1 --quiet --input=none "


class SlurmRemote(ShellRemote):
    """Commands run on the allocation's node through ``srun --overlap``; files are copied
    by the login side into the run's directory on the shared file system; the server's
    port is reached directly when the node is this machine."""

    def __init__(self, tools: SlurmTools, job_id: str, workdir: str, node: str,
                 run_id: str) -> None:
        self.tools = tools
        self.job_id = job_id
        self.workdir = workdir
        self.node = node
        self.pgid_file = f"{workdir}/.pgids"
        self.run_env = {} if tools.login_host is None else {"EPHEMERA_RUN_ID": run_id}
        self.shell = tools.shell(run_id)

    def _path(self, path: str) -> str:
        return path if path.startswith("/") else f"{self.workdir}/{path}"

    def run(self, command: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, on_line: LineSink | None = None,
            log_path: Path | None = None) -> CommandResult:
        inner = f"cd {shlex.quote(self._path(cwd) if cwd else self.workdir)} && {command}"
        line = srun_prefix(self.job_id) + "sh -c " + shlex.quote(inner)
        # srun passes its environment on to the task: the job's values travel that way,
        # never on a command line.
        return self.shell.run(line, env={**(env or {}), **self.run_env}, timeout=timeout, on_line=on_line,
                              log_path=log_path)

    def put(self, local: Path, remote: str, *, timeout: float | None = None) -> None:
        self.shell.put(local, self._path(remote), timeout=timeout)

    def get(self, remote: str, local: Path, *, timeout: float | None = None,
            within: str | None = None, refused: list[str] | None = None) -> list[Path]:
        return self.shell.get(self._path(remote), local, timeout=timeout,
                              within=self._path(within) if within else None, refused=refused)

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        if remote_host not in ("127.0.0.1", "localhost") or not node_is_here(self.node, self.tools):
            raise InfraError(f"the server runs on node {self.node}, which is not this machine: "
                             "run ephemera on the cluster's login node or on the node itself")
        return remote_port

    def close(self) -> None:
        self.shell.close()


def node_is_here(node: str, tools: SlurmTools) -> bool:
    import socket

    names = {socket.gethostname(), socket.gethostname().split(".")[0], "localhost"}
    return tools.login_host is None and node in names
