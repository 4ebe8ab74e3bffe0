"""The channel to an instance: run commands, start detached processes, copy files,
reach a port. Implemented over SSH (ephemera.transport.ssh), the Docker API and local
processes; the controller only ever sees this interface.

Every call that can block takes a timeout, so the controller's deadlines hold even
when the other side stops answering.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ephemera.errors import RemoteCommandError

LineSink = Callable[[str], None]


@dataclass(frozen=True)
class CommandResult:
    exit_status: int | None      # None when the command was cut off (timed_out)
    output_tail: str = ""        # the last lines of combined output, for messages
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_status == 0 and not self.timed_out


@runtime_checkable
class Remote(Protocol):
    def run(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_line: LineSink | None = None,
        log_path: Path | None = None,
    ) -> CommandResult:
        """Run ``sh -c command`` to the end (or the timeout, which kills its process group).
        Output (stdout and stderr, never deadlocking on either) goes line by line to
        ``on_line`` and ``log_path``; values of ``env`` are never written to either."""
        ...

    def start(self, command: str, *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, log_file: str) -> str:
        """Start ``command`` detached in its own session, output to ``log_file`` on the
        instance; return a handle (the process group id) at once."""
        ...

    def is_running(self, handle: str) -> bool: ...

    def stop(self, handle: str, grace: float = 5.0) -> None:
        """SIGTERM the handle's process group, then SIGKILL after ``grace`` seconds."""
        ...

    def put(self, local: Path, remote: str, *, timeout: float | None = None) -> None:
        """Copy a file or a directory (recursively) to ``remote`` on the instance."""
        ...

    def get(self, remote: str, local: Path, *, timeout: float | None = None,
            within: str | None = None, refused: list[str] | None = None) -> list[Path]:
        """Copy a file, a directory or a glob from the instance into the directory
        ``local``; return the local files written. Missing remote paths give [].

        What the instance holds is written by the job, which may be hostile: symbolic
        links are never followed (neither the path itself nor anything inside a
        directory), names that are not plain file names are skipped, and with
        ``within`` a path whose real location is outside that directory is refused.
        Each thing left out is described in ``refused``."""
        ...

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        """Make ``remote_host:remote_port`` on the instance reachable on 127.0.0.1 here;
        return the local port. Lives until close()."""
        ...

    def close(self) -> None: ...


MASK = "***"


def env_masker(env: Mapping[str, str] | None) -> Callable[[str], str]:
    """A function that hides the values of ``env`` (4 characters or more, longest first)
    in a line, so a command that echoes a secret does not write it to the console or a
    log. Every channel (local, docker, SSH) masks its commands' output with it."""
    values = sorted({str(v) for v in (env or {}).values() if len(str(v)) >= 4},
                    key=len, reverse=True)

    def mask(line: str) -> str:
        for value in values:
            line = line.replace(value, MASK)
        return line

    return mask


def plain_name(name: str) -> bool:
    """A file name from the instance that is safe to join to a local directory."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name and "\\" not in name


def inside(path: str, root: str) -> bool:
    """Whether the (already resolved) POSIX ``path`` is ``root`` or below it."""
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"


def detached_command(command: str, *, cwd: str | None, log_file: str,
                     pgid_file: str | None = None) -> str:
    """A shell line that starts ``command`` in a new session with its output in
    ``log_file`` and prints the new process group id (= the pid of the session's shell).

    The id is printed by the new session's own shell, after ``setsid``: when the caller
    reads it, the process group exists (printing ``$!`` from the parent raced the
    child's ``setsid``, and a check right after the start could find no group for a
    process that was alive). With ``pgid_file`` the id is appended there first, in the
    same step, so no moment exists where the process runs unrecorded. The environment
    is not part of the line: it travels with the channel's ``run`` and is inherited."""
    inner = ""
    if pgid_file:
        inner += f'echo "$$" >> {shlex.quote(pgid_file)} || exit 125; '
    inner += 'echo "$$" >&3; exec 3>&-; '
    if cwd:
        inner += f"cd {shlex.quote(cwd)} && "
    inner += command
    log = shlex.quote(log_file)
    return (f"mkdir -p $(dirname {log}) && "
            f"setsid sh -c {shlex.quote(inner)} 3>&1 > {log} 2>&1 < /dev/null &")


def is_running_command(handle: str) -> str:
    return f"kill -s 0 -- -{int(handle)} 2>/dev/null && echo yes || echo no"


def stop_command(handle: str, grace: float) -> str:
    pg = int(handle)
    steps = max(1, int(grace * 10))
    return (
        f"kill -s TERM -- -{pg} 2>/dev/null; "
        f"for i in $(seq {steps}); do kill -s 0 -- -{pg} 2>/dev/null || exit 0; sleep 0.1; done; "
        f"kill -s KILL -- -{pg} 2>/dev/null; exit 0"
    )


class ShellRemote:
    """Implements start/is_running/stop on top of ``run`` with POSIX shell commands.
    Concrete channels subclass it and provide run, put, get, forward and close.
    ``pgid_file``, where set, is the file on the instance that records every process
    group the run starts (the provider's terminate and dead-man switch read it)."""

    pgid_file: str | Path | None = None

    def run(self, command: str, **kwargs) -> CommandResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self, command: str, *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, log_file: str) -> str:
        line = detached_command(command, cwd=cwd, log_file=log_file,
                                pgid_file=str(self.pgid_file) if self.pgid_file else None)
        # The environment goes through run's own channel (exported to the starting shell
        # and inherited), never into a command line where the host's process list shows it.
        result = self.run(line, env=env, timeout=60)
        lines = result.output_tail.strip().splitlines()
        handle = lines[-1].strip() if lines else ""
        if not result.ok or not handle.isdigit():
            raise RemoteCommandError(
                f"could not start a detached process on the instance: {result.output_tail[-500:]}",
                exit_status=result.exit_status, output_tail=result.output_tail)
        return handle

    def is_running(self, handle: str) -> bool:
        result = self.run(is_running_command(handle), timeout=30)
        return result.ok and result.output_tail.strip().endswith("yes")

    def stop(self, handle: str, grace: float = 5.0) -> None:
        self.run(stop_command(handle, grace), timeout=grace + 30)
