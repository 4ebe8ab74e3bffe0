"""The channel to an instance: run commands, start detached processes, copy files,
reach a port. Implemented over SSH (ephemera.ssh), the Docker API and local
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

    def get(self, remote: str, local: Path, *, timeout: float | None = None) -> list[Path]:
        """Copy a file, a directory or a glob from the instance into the directory
        ``local``; return the local files written. Missing remote paths give []."""
        ...

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        """Make ``remote_host:remote_port`` on the instance reachable on 127.0.0.1 here;
        return the local port. Lives until close()."""
        ...

    def close(self) -> None: ...


def env_prefix(env: Mapping[str, str] | None) -> str:
    """``export K='v'; `` for a shell command line (quoted)."""
    if not env:
        return ""
    return "".join(f"export {k}={shlex.quote(str(v))}; " for k, v in env.items())


def detached_command(command: str, *, env: Mapping[str, str] | None, cwd: str | None,
                     log_file: str) -> str:
    """A shell line that starts ``command`` in a new session with its output in
    ``log_file`` and prints the new process group id (= its pid)."""
    inner = env_prefix(env)
    if cwd:
        inner += f"cd {shlex.quote(cwd)} && "
    inner += command
    return (
        f"mkdir -p $(dirname {shlex.quote(log_file)}) && "
        f"setsid sh -c {shlex.quote(inner)} > {shlex.quote(log_file)} 2>&1 < /dev/null & echo $!"
    )


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
    Concrete channels subclass it and provide run, put, get, forward and close."""

    def run(self, command: str, **kwargs) -> CommandResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self, command: str, *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, log_file: str) -> str:
        from ephemera.errors import RemoteCommandError

        result = self.run(detached_command(command, env=env, cwd=cwd, log_file=log_file),
                          timeout=60)
        handle = result.output_tail.strip().splitlines()[-1:] if result.output_tail else []
        if not result.ok or not handle or not handle[0].isdigit():
            raise RemoteCommandError(
                f"could not start a detached process on the instance: {result.output_tail[-500:]}",
                exit_status=result.exit_status, output_tail=result.output_tail)
        return handle[0]

    def is_running(self, handle: str) -> bool:
        result = self.run(is_running_command(handle), timeout=30)
        return result.ok and result.output_tail.strip().endswith("yes")

    def stop(self, handle: str, grace: float = 5.0) -> None:
        self.run(stop_command(handle, grace), timeout=grace + 30)
