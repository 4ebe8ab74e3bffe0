"""Which host keys an SSH connection accepts.

A host is trusted only through something the user or the provider vouches for, in this
order: the key the run pinned earlier (or the provider read from a trusted source, as
the AWS console output), a key or fingerprint configured for the host
(``resources.ssh.host_key``, ``EPHEMERA_SSH_HOST_KEY``, ``EPHEMERA_SSH_BASTION_HOST_KEY``),
then the ``known_hosts`` files (``EPHEMERA_SSH_KNOWN_HOSTS``, else
``~/.ssh/known_hosts`` and ``/etc/ssh/ssh_known_hosts``). A host none of them knows is
refused with its fingerprint, unless first-use trust was asked for
(``EPHEMERA_SSH_TRUST_FIRST_USE=1``). Within a run, the key seen first is pinned and
every later connection must present it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ephemera.errors import ConfigError, InfraError
from ephemera.spec.settings import get_settings

if TYPE_CHECKING:  # pragma: no cover
    import paramiko

log = logging.getLogger(__name__)

MAX_KNOWN_HOSTS_BYTES = 4 * 1024 * 1024
SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")


class HostKeyChangedError(InfraError):
    """The host presented another key than the one pinned or known for it."""

    kind = "host key changed"


class HostKeyUnknownError(ConfigError):
    """Nothing the user trusts vouches for the host's key."""

    kind = "unknown host key"


def key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def fingerprint(key_blob_b64: str) -> str:
    """OpenSSH's SHA256 fingerprint of a key given as its base64 blob."""
    digest = hashlib.sha256(base64.b64decode(key_blob_b64)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_pattern(host: str, port: int) -> str:
    """How known_hosts names a host: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def accepted_entries(text: str | None) -> list[str]:
    """Configured or pinned keys: one per line, each ``TYPE BASE64 [comment]`` or a
    ``SHA256:...`` fingerprint. Malformed entries are a config error."""
    entries: list[str] = []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if parts[0].startswith("SHA256:") and len(parts) == 1:
            entries.append(parts[0])
            continue
        if len(parts) < 2:
            raise ConfigError(f"host key {line[:60]!r} is neither 'TYPE BASE64' nor a "
                              "SHA256:... fingerprint")
        try:
            base64.b64decode(parts[1], validate=True)
        except ValueError:
            raise ConfigError(f"host key {line[:60]!r}: the key is not base64") from None
        entries.append(f"{parts[0]} {parts[1]}")
    return entries


def matches(key: paramiko.PKey, entries: list[str]) -> bool:
    seen_type, seen_blob = key.get_name(), key.get_base64()
    seen_fp = fingerprint(seen_blob)
    for entry in entries:
        if entry.startswith("SHA256:"):
            if entry.rstrip("=") == seen_fp:
                return True
            continue
        kind, blob = entry.split()[:2]
        if kind == seen_type and blob == seen_blob:
            return True
    return False


@dataclass(frozen=True)
class Trust:
    """Where first contact looks: known_hosts files and whether first use is trusted."""

    known_hosts: tuple[Path, ...]
    first_use: bool

    @classmethod
    def from_settings(cls) -> Trust:
        settings = get_settings()
        if settings.ssh_known_hosts is not None:
            files: tuple[Path, ...] = (settings.ssh_known_hosts,)
        else:
            files = (Path.home() / ".ssh" / "known_hosts", SYSTEM_KNOWN_HOSTS)
        return cls(known_hosts=files, first_use=settings.ssh_trust_first_use)


def known_keys(files: tuple[Path, ...], host: str, port: int) -> tuple[list[str], Path | None]:
    """The keys known_hosts lists for the host (hashed names included), and the file."""
    import paramiko

    name = host_pattern(host, port)
    for path in files:
        try:
            if not path.is_file():
                continue
            if path.stat().st_size > MAX_KNOWN_HOSTS_BYTES:
                raise ConfigError(f"known_hosts file {path} is larger than "
                                  f"{MAX_KNOWN_HOSTS_BYTES} bytes")
            table = paramiko.HostKeys()
            table.load(str(path))
        except OSError as exc:
            raise ConfigError(f"cannot read known_hosts file {path}: {exc.strerror or exc}") \
                from None
        except (paramiko.SSHException, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"known_hosts file {path} cannot be read: {exc}") from None
        found = table.lookup(name)
        if found:
            return [f"{kind} {key.get_base64()}" for kind, key in found.items()], path
    return [], None


def first_contact(key: paramiko.PKey, host: str, port: int, where: str,
                  trust: Trust | None = None) -> None:
    """Accept the key of a host met for the first time in this run, or raise."""
    trust = trust or Trust.from_settings()
    seen_fp = fingerprint(key.get_base64())
    entries, path = known_keys(trust.known_hosts, host, port)
    if entries:
        if matches(key, entries):
            return
        raise HostKeyChangedError(
            f"{where} presented the host key {key.get_name()} {seen_fp}, which is not the key "
            f"{path} lists for {host_pattern(host, port)}; refusing to connect.",
            hint="Someone may be intercepting the connection, or the machine was replaced; "
                 "check the host and update known_hosts only if the new key is genuine.")
    if trust.first_use:
        log.warning("trusting the host key of %s on first use: %s %s", where, key.get_name(),
                    seen_fp)
        return
    shown = ", ".join(str(p) for p in trust.known_hosts) or "no known_hosts file"
    raise HostKeyUnknownError(
        f"{where} presented the host key {key.get_name()} {seen_fp}, which is in no known_hosts "
        f"file ({shown}) and matches no configured host key; refusing to connect.",
        hint=(f"Check the fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_"
              f"{_file_kind(key.get_name())}_key.pub), then add it: ssh-keyscan -p {port} {host} "
              ">> ~/.ssh/known_hosts (or EPHEMERA_SSH_KNOWN_HOSTS), or set resources.ssh.host_key "
              f"to '{seen_fp}'. EPHEMERA_SSH_TRUST_FIRST_USE=1 accepts unknown hosts (unsafe on "
              "shared networks)."))


def _file_kind(key_type: str) -> str:
    if "ed25519" in key_type:
        return "ed25519"
    if "ecdsa" in key_type:
        return "ecdsa"
    return "rsa"


# Cloud-init prints the host's public keys to the serial console between these lines.
CONSOLE_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
CONSOLE_END = "-----END SSH HOST KEY KEYS-----"


def keys_from_console(text: str) -> list[str]:
    """The host keys a cloud-init console output lists (empty when it has none yet)."""
    start = text.find(CONSOLE_BEGIN)
    if start < 0:
        return []
    end = text.find(CONSOLE_END, start)
    if end < 0:
        return []
    block = text[start + len(CONSOLE_BEGIN):end]
    keys: list[str] = []
    for raw in block.splitlines():
        parts = raw.strip().split()
        if len(parts) >= 2 and (parts[0].startswith("ssh-") or parts[0].startswith("ecdsa-")):
            try:
                base64.b64decode(parts[1], validate=True)
            except ValueError:
                continue
            keys.append(f"{parts[0]} {parts[1]}")
    return keys
