"""The SSH channel shared by every provider that reaches its machine over SSH
(ssh, aws, docker in ssh mode).

Why it looks the way it does:

- paramiko does not notice a dead or frozen peer by itself, and several of its calls
  (``exec_command``, ``invoke_subsystem``) wait without a timeout. Every blocking step
  here therefore runs under a timer of our own that closes the channel (or the whole
  transport) when its deadline passes, so a frozen host fails the run in time.
- stdout and stderr are combined on the server side of the channel and drained in one
  loop, so a command that floods both streams cannot deadlock us.
- Every command runs in a new session (``setsid``) whose id is reported first on the
  channel, so a timeout can kill the command's whole process group on the host.
- A host key is accepted only when something trusted vouches for it (see
  :mod:`ephemera.hostkeys`); later connections of the same run must present the same
  key, or the run stops with :class:`HostKeyChangedError`.
- Environment values are sent on the command's stdin (never on its command line) and
  masked in every line written to the console or a log file.
"""

from __future__ import annotations

import codecs
import fnmatch
import logging
import os
import posixpath
import select
import shlex
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ephemera.errors import AuthError, InfraError, PhaseTimeoutError, TransientError
from ephemera.hostkeys import (
    HostKeyChangedError,
    HostKeyUnknownError,
    accepted_entries,
    fingerprint,
    first_contact,
    key_line,
    matches,
)
from ephemera.remote import CommandResult, LineSink, ShellRemote, inside, plain_name
from ephemera.settings import get_settings

if TYPE_CHECKING:  # pragma: no cover
    import paramiko

    from ephemera.provider import Endpoint

log = logging.getLogger(__name__)

PGID_MARK = "@@ephemera-pgid"
TAIL_LINES = 200
MASK = "***"


# ---------------------------------------------------------------------------- keys


def generate_keypair(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """A fresh ed25519 key for one run: (private key file, public key line).

    The private key is written with mode 0600 in OpenSSH format; the caller deletes
    ``directory`` (or the file) when the run ends.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    (directory / f"{name}.pub").write_text(public + " ephemera\n")
    return path, f"{public} ephemera"


def _load_private_key(path: str) -> paramiko.PKey:
    import paramiko

    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise AuthError(f"SSH key file not found: {path}",
                        hint="Set resources.ssh.key or EPHEMERA_SSH_KEY.") from None
    except (paramiko.SSHException, ValueError) as exc:
        raise AuthError(f"cannot read SSH key {path}: {exc}") from None


# ----------------------------------------------------------------- host key pinning


class HostKeyPin:
    """The host key of one machine for the length of a run.

    ``line`` holds what is accepted before first contact: keys (``TYPE BASE64``, one per
    line, as a provider read them from a trusted source) or ``SHA256:`` fingerprints
    configured by the user. Empty, first contact asks :mod:`ephemera.hostkeys` (known_hosts,
    first-use trust). After the first connection the key seen is pinned, and every
    later connection must present it. With a ``path`` the pin survives this process.
    """

    def __init__(self, line: str | None = None, path: Path | None = None) -> None:
        self.path = path
        self.line = line or None
        if self.line is None and path is not None and path.exists():
            self.line = path.read_text().strip() or None

    def check(self, key: paramiko.PKey, target: Target) -> None:
        seen = key_line(key)
        if self.line is None:
            first_contact(key, target.host, target.port, target.where)
        elif not matches(key, accepted_entries(self.line)):
            pinned = accepted_entries(self.line)
            shown = ", ".join(e if e.startswith("SHA256:") else fingerprint(e.split()[1])
                              for e in pinned)
            raise HostKeyChangedError(
                f"the host key of {target.where} changed: it presented {key.get_name()} "
                f"{fingerprint(key.get_base64())}, not the key pinned for it ({shown}); "
                "refusing to continue.",
                hint="Someone may be intercepting the connection, or the machine was replaced.")
        if self.line != seen:
            self.line = seen
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.write_text(seen + "\n")


# ---------------------------------------------------------------------- connecting


@dataclass(frozen=True)
class Target:
    host: str
    port: int = 22
    user: str = "root"
    key_path: str | None = None
    proxy_jump: str | None = None   # user@host[:port]

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @classmethod
    def from_endpoint(cls, endpoint: Endpoint) -> Target:
        return cls(host=endpoint.host, port=endpoint.port, user=endpoint.user,
                   key_path=endpoint.key_path, proxy_jump=endpoint.proxy_jump)


def _parse_jump(spec: str, key_path: str | None) -> Target:
    user, _, hostport = spec.rpartition("@")
    host, _, port = hostport.partition(":")
    if not host:
        raise InfraError(f"malformed proxy jump '{spec}' (expected user@host[:port])")
    return Target(host=host, port=int(port or 22), user=user or "root", key_path=key_path)


_PERMANENT = (HostKeyChangedError, HostKeyUnknownError, AuthError)


class _Expired(Exception):
    """Our own deadline closed the transport."""


@contextmanager
def guard(seconds: float, on_expire: Callable[[], Any]) -> Iterator[threading.Event]:
    """Call ``on_expire`` (which must unblock the guarded call, e.g. by closing a
    channel) if the block is still running after ``seconds``. The yielded event is set
    when that happened."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        try:
            on_expire()
        except Exception:  # noqa: BLE001 - best effort from a timer thread
            log.debug("deadline action failed", exc_info=True)

    timer = threading.Timer(max(0.0, seconds), fire)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def _connect_once(target: Target, pin: HostKeyPin, timeout: float,
                  sock: Any = None) -> paramiko.SSHClient:
    import paramiko

    class _Pin(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):  # noqa: ANN001
            pin.check(key, target)

    pkey = _load_private_key(target.key_path) if target.key_path else None
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_Pin())
    sock_obj = sock

    def _close() -> None:
        client.close()
        if sock_obj is not None:
            sock_obj.close()

    with guard(timeout + 1, _close) as fired:
        try:
            client.connect(
                target.host, port=target.port, username=target.user, pkey=pkey,
                allow_agent=False, look_for_keys=False, timeout=timeout,
                banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
                sock=sock,
            )
        except Exception:
            client.close()
            if fired.is_set():
                raise _Expired(f"no SSH handshake with {target.where} within {timeout:.0f}s") from None
            raise
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(15)
    return client


def connect(target: Target, *, deadline: float, pin: HostKeyPin | None = None,
            attempt_timeout: float = 20.0) -> paramiko.SSHClient:
    """An authenticated SSH client, retrying with backoff until the host answers or
    ``deadline`` (seconds from now) passes. A changed host key is never retried."""
    import paramiko
    from tenacity import (
        RetryError,
        Retrying,
        retry_if_not_exception_type,
        stop_after_delay,
        wait_exponential,
    )

    pin = pin if pin is not None else HostKeyPin()
    end = time.monotonic() + deadline
    last: list[BaseException] = []

    def attempt() -> paramiko.SSHClient:
        remaining = max(1.0, end - time.monotonic())
        per_try = min(attempt_timeout, remaining)
        sock = bastion = None
        try:
            if target.proxy_jump:
                # The target is reached through a direct-tcpip channel of the bastion;
                # the bastion's connection is closed with the target's (see close_client).
                bastion = connect(_parse_jump(target.proxy_jump, target.key_path),
                                  deadline=per_try, attempt_timeout=per_try,
                                  pin=HostKeyPin(get_settings().ssh_bastion_host_key))
                bt = bastion.get_transport()
                assert bt is not None
                sock = bt.open_channel("direct-tcpip", (target.host, target.port),
                                       ("127.0.0.1", 0), timeout=per_try)
            client = _connect_once(target, pin, per_try, sock=sock)
            client._ephemera_bastion = bastion  # type: ignore[attr-defined]
            return client
        except paramiko.BadHostKeyException as exc:
            close_client(bastion)
            raise HostKeyChangedError(f"host key of {target.where} does not match: {exc}") from None
        except BaseException as exc:
            close_client(bastion)
            last[:] = [exc]
            raise

    try:
        for step in Retrying(
            stop=stop_after_delay(deadline),
            wait=wait_exponential(multiplier=0.5, min=0.5, max=10),
            retry=retry_if_not_exception_type(_PERMANENT),
            reraise=False,
        ):
            with step:
                return attempt()
    except RetryError:
        pass
    exc = last[0] if last else None
    if isinstance(exc, paramiko.AuthenticationException):
        raise AuthError(f"SSH login to {target.where} refused until the deadline ({deadline:.0f}s): {exc}",
                        hint="Check the user and key (resources.ssh / EPHEMERA_SSH_*).") from None
    raise TransientError(
        f"could not reach {target.where} over SSH within {deadline:.0f}s: "
        f"{type(exc).__name__ if exc else 'no attempt'}: {exc}") from None


def close_client(client: paramiko.SSHClient | None) -> None:
    """Close a client from :func:`connect` and the bastion connection it rides on."""
    if client is None:
        return
    client.close()
    close_client(getattr(client, "_ephemera_bastion", None))


# ------------------------------------------------------------------------- helpers


class _Masker:
    """Replaces environment values in text written anywhere."""

    def __init__(self, env: Mapping[str, str] | None) -> None:
        values = {str(v) for v in (env or {}).values() if len(str(v)) >= 4}
        self.values = sorted(values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        return text


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

    def __init__(self, on_line: LineSink | None, log_path: Path | None, mask: _Masker) -> None:
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


# -------------------------------------------------------------------------- remote


class SSHRemote(ShellRemote):
    """:class:`ephemera.remote.Remote` over one SSH connection (reconnected on demand)."""

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
        self._forwards: list[_Forward] = []

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
        mask = _Masker(env)
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

    # -- files

    def _sftp(self, timeout: float) -> paramiko.SFTPClient:
        import paramiko

        chan = self._session(timeout)
        with guard(timeout, chan.close) as fired:
            try:
                chan.invoke_subsystem("sftp")
                client = paramiko.SFTPClient(chan)
            except Exception as exc:  # noqa: BLE001
                chan.close()
                if fired.is_set():
                    raise PhaseTimeoutError("sftp", timeout,
                                            f"SFTP on {self.target.where} did not start within {timeout:.0f}s") from None
                raise TransientError(f"SFTP on {self.target.where} failed: {exc}") from None
        chan.settimeout(min(timeout, 30.0))
        return client

    @contextmanager
    def _transfer(self, what: str, timeout: float | None) -> Iterator[paramiko.SFTPClient]:
        budget = timeout or 3600.0
        sftp = self._sftp(min(budget, self.op_timeout))
        try:
            with guard(budget, sftp.close) as fired:
                try:
                    yield sftp
                except Exception as exc:
                    if fired.is_set():
                        raise PhaseTimeoutError(what, budget,
                                                f"{what} with {self.target.where} did not finish within {budget:.0f}s") from None
                    if isinstance(exc, (OSError, EOFError)) and not isinstance(exc, FileNotFoundError):
                        raise TransientError(f"{what} with {self.target.where} failed: {exc}") from None
                    raise
        finally:
            sftp.close()

    def put(self, local: Path, remote: str, *, timeout: float | None = None) -> None:
        local = Path(local)
        if not local.exists():
            raise FileNotFoundError(f"nothing to upload: {local}")
        with self._transfer("upload", timeout) as sftp:
            if local.is_dir():
                _sftp_makedirs(sftp, remote)
                for root, dirs, files in os.walk(local):
                    rel = os.path.relpath(root, local)
                    base = remote if rel == "." else posixpath.join(remote, *Path(rel).parts)
                    for d in dirs:
                        _sftp_makedirs(sftp, posixpath.join(base, d))
                    for f in files:
                        src = os.path.join(root, f)
                        sftp.put(src, posixpath.join(base, f))
                        sftp.chmod(posixpath.join(base, f), os.stat(src).st_mode & 0o777)
            else:
                parent = posixpath.dirname(remote)
                if parent:
                    _sftp_makedirs(sftp, parent)
                sftp.put(str(local), remote)
                sftp.chmod(remote, local.stat().st_mode & 0o777)

    def get(self, remote: str, local: Path, *, timeout: float | None = None,
            within: str | None = None, refused: list[str] | None = None) -> list[Path]:
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        refused = refused if refused is not None else []
        with self._transfer("download", timeout) as sftp:
            root = sftp.normalize(within) if within else None
            for path in _sftp_glob(sftp, remote):
                try:
                    st = sftp.lstat(path)
                    real = sftp.normalize(path)
                except (FileNotFoundError, OSError):
                    continue
                name = posixpath.basename(path.rstrip("/"))
                if stat.S_ISLNK(st.st_mode or 0):
                    refused.append(f"{path} is a symbolic link (to {real}): not followed")
                    continue
                if root is not None and not inside(real, root):
                    refused.append(f"{path} is outside the run directory {within}: not copied")
                    continue
                if not plain_name(name):
                    refused.append(f"{path}: not a plain file name")
                    continue
                dest = local / name
                if stat.S_ISDIR(st.st_mode or 0):
                    _sftp_get_tree(sftp, path, dest, written, refused)
                elif stat.S_ISREG(st.st_mode or 0):
                    _sftp_get_file(sftp, path, dest, st.st_size)
                    written.append(dest)
        return written

    # -- ports

    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        fwd = _Forward(self, remote_host, remote_port)
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


def _sftp_makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = [p for p in path.split("/") if p]
    current = "/" if path.startswith("/") else ""
    for part in parts:
        current = posixpath.join(current, part) if current else part
        try:
            sftp.stat(current)
        except FileNotFoundError:
            sftp.mkdir(current)


def _sftp_glob(sftp: paramiko.SFTPClient, pattern: str) -> list[str]:
    """Expand a remote glob (only in the last path components) with SFTP listings."""
    if not any(c in pattern for c in "*?["):
        return [pattern]
    parts = pattern.split("/")
    roots = ["/" if pattern.startswith("/") else "."]
    for i, part in enumerate(p for p in parts if p != ""):
        last = i == len([p for p in parts if p]) - 1
        next_roots = []
        for root in roots:
            if not any(c in part for c in "*?["):
                next_roots.append(posixpath.join(root, part))
                continue
            try:
                entries = sftp.listdir_attr(root)
            except (FileNotFoundError, OSError):
                continue
            for e in sorted(entries, key=lambda e: e.filename):
                if fnmatch.fnmatchcase(e.filename, part) and (last or stat.S_ISDIR(e.st_mode or 0)):
                    next_roots.append(posixpath.join(root, e.filename))
        roots = next_roots
    return [r[2:] if r.startswith("./") else r for r in roots]


def _sftp_get_file(sftp: paramiko.SFTPClient, remote: str, dest: Path, size: int | None) -> None:
    """Download to a temporary name and rename only when complete. Prefetching (many
    reads in flight) is what makes SFTP fast; the transfer's deadline (see
    ``SSHRemote._transfer``) closes the channel if a server stalls it."""
    part = dest.with_name(dest.name + ".part")
    try:
        sftp.get(remote, str(part), prefetch=True, max_concurrent_prefetch_requests=64)
        got = part.stat().st_size
        if size is not None and got != size:
            raise TransientError(f"download of {remote} incomplete ({got} of {size} bytes)")
        part.replace(dest)
    finally:
        part.unlink(missing_ok=True)


def _sftp_get_tree(sftp: paramiko.SFTPClient, remote: str, dest: Path, written: list[Path],
                   refused: list[str]) -> None:
    """A directory, recursively: plain files and directories only (listings carry each
    entry's own attributes, so a symbolic link is seen as one and left out)."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sftp.listdir_attr(remote):
        src = posixpath.join(remote, entry.filename)
        mode = entry.st_mode or 0
        if not plain_name(entry.filename):
            refused.append(f"{src}: not a plain file name")
        elif stat.S_ISLNK(mode):
            refused.append(f"{src} is a symbolic link: not followed")
        elif stat.S_ISDIR(mode):
            _sftp_get_tree(sftp, src, dest / entry.filename, written, refused)
        elif stat.S_ISREG(mode):
            _sftp_get_file(sftp, src, dest / entry.filename, entry.st_size)
            written.append(dest / entry.filename)


class _Forward:
    """A listener on 127.0.0.1 whose connections are carried to ``host:port`` on the
    instance through direct-tcpip channels (no port is opened on the instance)."""

    def __init__(self, remote: SSHRemote, host: str, port: int) -> None:
        self.remote = remote
        self.dest = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._accept, name=f"ssh-forward-{self.port}",
                                       daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        try:
            chan = self.remote.transport().open_channel(
                "direct-tcpip", self.dest, client.getpeername(), timeout=15)
        except Exception as exc:  # noqa: BLE001
            log.debug("forward to %s failed: %s", self.dest, exc)
            client.close()
            return
        try:
            while not self.stopped.is_set():
                ready, _, _ = select.select([client, chan], [], [], 0.5)
                if client in ready:
                    data = client.recv(65536)
                    if not data:
                        break
                    chan.sendall(data)
                if chan in ready:
                    data = chan.recv(65536)
                    if not data:
                        break
                    client.sendall(data)
        except OSError:
            pass
        finally:
            chan.close()
            client.close()

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.thread.join(timeout=2)
