"""Files over SSH (SFTP), with deadlines: uploads keep file modes; downloads never
follow a symbolic link, never copy from outside the run directory and take only plain
file names. A mixin of :class:`ephemera.transport.ssh_remote.SSHRemote`."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ephemera.errors import PhaseTimeoutError, TransientError
from ephemera.transport.remote import inside, plain_name
from ephemera.transport.ssh import Target, guard

if TYPE_CHECKING:  # pragma: no cover
    import paramiko


class SFTPTransfer:
    """``put`` and ``get`` for a remote that opens sessions (``_session``)."""

    target: Target
    op_timeout: float

    def _session(self, timeout: float) -> paramiko.Channel:  # pragma: no cover - the remote's
        raise NotImplementedError


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
