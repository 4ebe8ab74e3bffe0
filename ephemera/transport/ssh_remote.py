"""Commands over SSH: :class:`SSHRemote`, the :class:`ephemera.transport.remote.Remote` of every
provider that reaches its machine over SSH.

- paramiko does not notice a dead or frozen peer by itself, and several of its calls
  wait without a timeout: every blocking step runs under a timer of our own that closes
  the channel when its deadline passes, so a frozen host fails the run in time.
- stdout and stderr are combined on the server side and drained in one loop, so a
  command that floods both streams cannot deadlock us.
- Every command runs in a new session (``setsid``) whose id is reported first on the
  channel, so a timeout can kill the command's whole process group on the host.
- Environment values are sent on the command's stdin (never on its command line) and
  masked in every line written to the console or a log file.
"""

from __future__ import annotations

import codecs
import logging
import shlex
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ephemera.errors import TransientError
from ephemera.transport.remote import CommandResult, LineSink, ShellRemote, env_masker
from ephemera.transport.ssh import (
    HostKeyPin,
    Target,
    close_client,
    connect,
    guard,
)
from ephemera.transport.ssh_transfer import SFTPTransfer
from ephemera.transport.ssh_tunnel import Forward

if TYPE_CHECKING:  # pragma: no cover
    import paramiko

    from ephemera.provider import Endpoint

log = logging.getLogger(__name__)

PGID_MARK = "@@ephemera-pgid"
TAIL_LINES = 200


def wrap_command(command: str, *, env: Mapping[str, str] | None, cwd: str | None,
                 pgid_file: str | None = None, run_id: str | None = None) -> str:
    """The line sent to the server: a new session that first prints its id (and, for
    providers that clean up by process group, appends it to ``pgid_file``), reads the
    environment from stdin (so values stay off the process list), then runs
    ``sh -c command``."""
    inner = f'printf "{PGID_MARK} %s\\n" "$$"; '
    if run_id:   # not a secret: it marks the run's processes, so cleanup kills only those
        inner += f"EPHEMERA_RUN_ID={shlex.quote(run_id)}; export EPHEMERA_RUN_ID; "
    if pgid_file:
        inner += f'echo "$$" >> {shlex.quote(pgid_file)}; '
    if env:
        inner += "set -a; . /dev/stdin || exit 125; set +a; "
    if cwd:
        inner += f"cd {shlex.quote(cwd)} || exit 126; "
    inner += f"exec sh -c {shlex.quote(command)}"
    return f"exec setsid -w sh -c {shlex.quote(inner)}"


def env_script(env: Mapping[str, str]) -> bytes:
    return "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in env.items()).encode()


class _Lines:
    """Splits a byte stream into lines, sends them on, keeps the tail."""

    def __init__(self, on_line: LineSink | None, log_path: Path | None,
                 mask: Callable[[str], str]) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buffer = ""
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.on_line = on_line
        self.mask = mask
        self.log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self.pgid: str | None = None

    def feed(self, data: bytes, final: bool = False) -> None:
        self.buffer += self.decoder.decode(data, final)
        *lines, self.buffer = self.buffer.split("\n")
        if final and self.buffer:
            lines.append(self.buffer)
            self.buffer = ""
        for line in lines:
            self._emit(line.rstrip("\r"))

    def _emit(self, line: str) -> None:
        if self.pgid is None and line.startswith(PGID_MARK):
            self.pgid = line[len(PGID_MARK):].strip()
            return
        line = self.mask(line)
        self.tail.append(line)
        if self.log:
            self.log.write(line + "\n")
        if self.on_line:
            self.on_line(line)

    def close(self) -> None:
        self.feed(b"", final=True)
        if self.log:
            self.log.close()
            self.log = None




class SSHRemote(SFTPTransfer, ShellRemote):
    """:class:`ephemera.transport.remote.Remote` over one SSH connection (reconnected on demand)."""

    def __init__(self, target: Target, *, pin: HostKeyPin | None = None,
                 connect_timeout: float = 60.0, op_timeout: float = 60.0,
                 pgid_file: str | None = None, run_id: str | None = None) -> None:
        self.target = target
        self.run_id = run_id
        self.pgid_file = pgid_file
        self.pin = pin if pin is not None else HostKeyPin()
        self.connect_timeout = connect_timeout
        self.op_timeout = op_timeout
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._forwards: list[Forward] = []

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint, **kwargs: Any) -> SSHRemote:
        pin = kwargs.pop("pin", None) or HostKeyPin(endpoint.host_key)
        return cls(Target.from_endpoint(endpoint), pin=pin, **kwargs)

    # -- connection

    def transport(self) -> paramiko.Transport:
        with self._lock:
            t = self._client.get_transport() if self._client else None
            if t is None or not t.is_active():
                close_client(self._client)
                self._client = connect(self.target, deadline=self.connect_timeout, pin=self.pin)
                t = self._client.get_transport()
            assert t is not None
            return t

    def _session(self, timeout: float) -> paramiko.Channel:
        t = self.transport()
        try:
            return t.open_session(timeout=max(0.2, timeout))
        except Exception as exc:  # noqa: BLE001 - paramiko raises several kinds
            t.close()
            raise TransientError(f"cannot open an SSH channel to {self.target.where}: {exc}") from None

    # -- commands

    def run(self, command: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, on_line: LineSink | None = None,
            log_path: Path | None = None) -> CommandResult:
        start = time.monotonic()
        end = start + timeout if timeout else None
        mask = env_masker(env)
        lines = _Lines(on_line, log_path, mask)
        chan = self._session(min(self.op_timeout, timeout or self.op_timeout))
        finished = False
        try:
            chan.set_combine_stderr(True)
            step = min(self.op_timeout, timeout or self.op_timeout)
            with guard(step, chan.close) as fired:
                try:
                    chan.exec_command(wrap_command(command, env=env, cwd=cwd,
                                                   pgid_file=self.pgid_file, run_id=self.run_id))
                    if env:
                        chan.sendall(env_script(env))
                    chan.shutdown_write()
                except Exception as exc:  # noqa: BLE001
                    if fired.is_set():
                        return self._timed_out(lines, chan, "the host did not start the command")
                    raise TransientError(f"cannot run a command on {self.target.where}: {exc}") from None
            chan.settimeout(0.2)
            while True:
                if end is not None and time.monotonic() >= end:
                    return self._timed_out(lines, chan, None)
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    if not chan.get_transport().is_active():
                        break
                    continue
                if not data:
                    break
                lines.feed(data)
            lines.close()
            # Output has ended; the exit status follows at once unless the peer froze.
            while not chan.exit_status_ready():
                if chan.closed and not chan.exit_status_ready():
                    break
                if end is not None and time.monotonic() >= end:
                    return self._timed_out(lines, chan, None)
                time.sleep(0.01)
            status = chan.recv_exit_status() if chan.exit_status_ready() else None
            if status is None or status == -1:
                raise TransientError(
                    f"the SSH connection to {self.target.where} dropped while running a command",
                    hint=_tail_hint(lines))
            finished = True
            return CommandResult(exit_status=status, output_tail="\n".join(lines.tail))
        finally:
            if not finished:
                # Cut short by an exception (a signal, a dropped connection): end the
                # command's group without waiting on a peer that may not answer; the
                # provider's terminate ends every recorded group of the run anyway.
                lines.close()
                if lines.pgid:
                    threading.Thread(target=self._kill_group, args=(lines.pgid,), daemon=True).start()
            chan.close()

    def _timed_out(self, lines: _Lines, chan: paramiko.Channel, why: str | None) -> CommandResult:
        chan.close()
        lines.close()
        self._kill_group(lines.pgid)
        lines.pgid = None  # killed already; the finally clause need not repeat it
        tail = "\n".join(lines.tail)
        if why:
            tail = (tail + "\n" if tail else "") + why
        return CommandResult(exit_status=None, output_tail=tail, timed_out=True)

    def _kill_group(self, pgid: str | None) -> None:
        """Best effort, bounded: SIGKILL the command's process group on the host."""
        if not pgid or not pgid.isdigit():
            return
        try:
            t = self._client.get_transport() if self._client else None
            if t is None or not t.is_active():
                return
            chan = t.open_session(timeout=5)
            with guard(5, chan.close):
                chan.exec_command(f"kill -s KILL -- -{int(pgid)} 2>/dev/null; true")
                chan.settimeout(5)
                chan.recv_exit_status()
            chan.close()
        except Exception:  # noqa: BLE001 - the peer may be gone or frozen
            log.warning("could not kill process group %s on %s", pgid, self.target.where)

    # -- ports

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        fwd = Forward(self, remote_host, remote_port)
        self._forwards.append(fwd)
        return fwd.port

    def close(self) -> None:
        for fwd in self._forwards:
            fwd.close()
        self._forwards.clear()
        with self._lock:
            close_client(self._client)
            self._client = None


def _tail_hint(lines: _Lines) -> str | None:
    return ("Last output: " + " | ".join(list(lines.tail)[-3:])) if lines.tail else None
