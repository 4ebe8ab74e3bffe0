"""SSH connections shared by every provider that reaches its machine over SSH (ssh,
aws, docker in ssh mode): per-run keys, host key pins, targets, and connecting with
deadlines and retries. Commands run through :mod:`ephemera.transport.ssh_remote`, files move
through :mod:`ephemera.transport.ssh_transfer` and ports through :mod:`ephemera.transport.ssh_tunnel`.

Why it looks the way it does:

- paramiko does not notice a dead or frozen peer by itself, and its connect and
  handshake can wait without a timeout: each attempt runs under a timer of our own
  (``guard``) that closes the transport when its deadline passes, and attempts are
  retried with backoff until the boot deadline.
- A host key is accepted only when something trusted vouches for it (see
  :mod:`ephemera.transport.hostkeys`); later connections of the same run must present
  the same key, or the run stops with :class:`HostKeyChangedError`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ephemera.errors import AuthError, InfraError, TransientError
from ephemera.spec.settings import get_settings
from ephemera.transport.hostkeys import (
    HostKeyChangedError,
    HostKeyUnknownError,
    accepted_entries,
    fingerprint,
    first_contact,
    key_line,
    matches,
)

if TYPE_CHECKING:  # pragma: no cover
    import paramiko

    from ephemera.provider import Endpoint

log = logging.getLogger(__name__)



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
    configured by the user. Empty, first contact asks :mod:`ephemera.transport.hostkeys` (known_hosts,
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
