"""The channel into a container through the Docker API: exec for commands, tar
archives for copies. No sshd is needed in the image.

Each command runs in its own session (``setsid``) and first writes its process
group id to a file, so a timeout can kill the whole group inside the container
(killing the exec stream alone would leave the processes running).
"""

from __future__ import annotations

import collections
import posixpath
import queue
import shlex
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ephemera.errors import ConfigError, PhaseTimeoutError, RemoteCommandError
from ephemera.transport.remote import CommandResult, LineSink, ShellRemote, env_masker

TAIL_LINES = 60
GLOB_CHARS = set("*?[]")


class _MissingPath(Exception):
    """put_archive found no such directory in the container."""

# Runs inside the container as ``sh -c WRAPPER COMMAND PIDFILE CWD``: records the
# group id, runs the command in a child shell (same group), removes the file. stderr
# joins stdout in one pipe, so lines keep the order in which they were written.
WRAPPER = (
    'exec 2>&1; echo $$ > "$1"; '
    'if [ -n "$2" ]; then cd "$2" || { rm -f "$1"; exit 125; }; fi; '
    'sh -c "$0"; rc=$?; rm -f "$1"; exit $rc'
)


def glob_quote(pattern: str) -> str:
    """Quote a path for sh, leaving glob characters active (so ``ls -d`` expands them)."""
    return "".join(ch if ch in GLOB_CHARS or ch.isalnum() or ch in "/._-" else "\\" + ch
                   for ch in pattern)


class DockerRemote(ShellRemote):
    """Remote over the Docker API for one container."""

    concurrent_copies = True    # the engine serves several archive copies at once

    def __init__(self, client: Any, container_id: str, *, network: str = "bridge",
                 ports: Mapping[int, int] | None = None) -> None:
        self.client = client
        self.container_id = container_id
        self.network = network
        self.ports = dict(ports or {})

    # -- commands ----------------------------------------------------------------
    def run(self, command: str, *, env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, on_line: LineSink | None = None,
            log_path: Path | None = None) -> CommandResult:
        import docker

        api = self.client.api
        pidfile = f"/tmp/.ephemera-exec-{uuid.uuid4().hex}.pid"
        argv = ["setsid", "-w", "sh", "-c", WRAPPER, command, pidfile, cwd or ""]
        try:
            # Values of env travel in the exec request, never in the command line or logs.
            exec_id = api.exec_create(self.container_id, argv, stdout=True, stderr=True,
                                      environment=dict(env or {}))["Id"]
            stream = api.exec_start(exec_id, stream=True, demux=False)
        except docker.errors.NotFound:
            raise RemoteCommandError(f"container {self.container_id[:12]} is gone") from None
        except docker.errors.APIError as exc:
            raise RemoteCommandError(f"docker exec failed: {exc.explanation or exc}") from None

        chunks: queue.Queue[bytes | None] = queue.Queue()

        def reader() -> None:
            try:
                for chunk in stream:
                    chunks.put(chunk)
            except Exception:  # noqa: BLE001 - a broken stream ends the command
                pass
            finally:
                chunks.put(None)

        threading.Thread(target=reader, name="docker-exec-reader", daemon=True).start()
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        partial = b""
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False

        mask = env_masker(env)

        def emit(raw: bytes) -> None:
            line = mask(raw.decode("utf-8", errors="replace").rstrip("\r"))
            tail.append(line)
            if on_line:
                on_line(line)
            if log:
                log.write(line + "\n")
                log.flush()

        try:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    chunk = chunks.get(timeout=wait)
                except queue.Empty:
                    timed_out = True
                    self._kill_group(pidfile)
                    break
                if chunk is None:
                    break
                partial += chunk
                *lines, partial = partial.split(b"\n")
                for raw in lines:
                    emit(raw)
            if partial:
                emit(partial)
        finally:
            if log:
                log.close()
        if timed_out:
            return CommandResult(exit_status=None, output_tail="\n".join(tail), timed_out=True)
        try:
            status = api.exec_inspect(exec_id).get("ExitCode")
        except docker.errors.NotFound:
            raise RemoteCommandError(f"container {self.container_id[:12]} is gone") from None
        return CommandResult(exit_status=status, output_tail="\n".join(tail))

    def _kill_group(self, pidfile: str) -> None:
        """TERM, then KILL, the command's process group; remove its pid file."""
        script = (f'p=$(cat {pidfile} 2>/dev/null) || exit 0; kill -s TERM -- -$p 2>/dev/null; '
                  f'for i in 1 2 3 4 5 6 7 8 9 10; do kill -s 0 -- -$p 2>/dev/null || break; '
                  f'sleep 0.2; done; kill -s KILL -- -$p 2>/dev/null; rm -f {pidfile}')
        try:
            self.client.api.exec_start(
                self.client.api.exec_create(self.container_id, ["sh", "-c", script])["Id"])
        except Exception:  # noqa: BLE001 - the container may be gone already
            pass

    def _check(self, command: str, what: str, timeout: float = 60) -> CommandResult:
        result = self.run(command, timeout=timeout)
        if not result.ok:
            raise RemoteCommandError(f"{what} failed in the container: {result.output_tail[-300:]}",
                                     exit_status=result.exit_status,
                                     output_tail=result.output_tail)
        return result

    # -- copies ------------------------------------------------------------------
    def put(self, local: Path, remote: str, *, timeout: float | None = None) -> None:
        """Copy ``local`` (file or directory) to the path ``remote`` in the container."""
        local = Path(local)
        if not local.exists():
            raise ConfigError(f"cannot copy {local} to the instance: no such file or directory")
        parent, name = posixpath.split(remote.rstrip("/")) if remote.rstrip("/") else ("/", "")
        parent = parent or "/"
        name = name or local.name
        with tempfile.TemporaryFile() as buf:
            with tarfile.open(fileobj=buf, mode="w") as tar:
                tar.add(str(local), arcname=name)

            def copy() -> bool:
                # Straight to the parent; only a missing parent costs a second exec.
                try:
                    buf.seek(0)
                    return self._api_put(parent, buf)
                except _MissingPath:
                    self._check(f"mkdir -p {shlex.quote(parent)}", f"creating {parent}")
                    buf.seek(0)
                    return self._api_put(parent, buf)

            ok = self._within(timeout, copy, f"copying {local} to {remote}")
        if not ok:
            raise RemoteCommandError(f"docker refused the copy of {local} to {remote}")

    def _api_put(self, parent: str, data: Any) -> bool:
        import docker

        try:
            return self.client.api.put_archive(self.container_id, parent, data)
        except docker.errors.NotFound:
            raise _MissingPath(parent) from None

    def get(self, remote: str, local: Path, *, timeout: float | None = None,
            within: str | None = None, refused: list[str] | None = None) -> list[Path]:
        """Copy a file, directory or glob from the container into the directory ``local``:
        plain files and directories only, never a symbolic link (see Remote.get)."""
        return self.get_many([remote], local, timeout=timeout, within=within, refused=refused)[0]

    def get_many(self, remotes: list[str], local: Path, *, timeout: float | None = None,
                 within: str | None = None, refused: list[str] | None = None) -> list[list[Path]]:
        """``get`` of several paths, with one exec checking them all (an exec costs tens of
        milliseconds; the copies themselves go through the archive API)."""
        refused = refused if refused is not None else []
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        expanded: list[list[str]] = []
        for remote in remotes:
            if GLOB_CHARS & set(remote):
                listing = self.run(f"ls -d -- {glob_quote(remote)} 2>/dev/null", timeout=60)
                expanded.append([p for p in listing.output_tail.splitlines() if p.strip()]
                                if listing.ok else [])
            else:
                expanded.append([remote])
        checks = self._check_paths([p for paths in expanded for p in paths], within)
        out: list[list[Path]] = []
        for paths in expanded:
            written: list[Path] = []
            for path in paths:
                verdict = checks.get(path)
                if verdict == "M":
                    continue
                if verdict == "L":
                    refused.append(f"{path} is a symbolic link: not followed")
                elif verdict == "X":
                    refused.append(f"{path} is outside the run directory {within}: not copied")
                elif verdict is None:   # the check itself gave no answer: nothing unchecked
                    refused.append(f"{path} could not be checked in the container: not copied")
                else:
                    written += self._get_one(path, local, timeout, refused)
            out.append(written)
        return out

    def _check_paths(self, paths: list[str], within: str | None) -> dict[str, str]:
        """One exec: for each path M (missing), L (a symbolic link), X (outside ``within``)
        or O (may be copied). Only these letters come back: nothing the job named or made
        is parsed."""
        if not paths:
            return {}
        if within:
            verdict = ('elif [ -L "$p" ]; then s=L; else r=$(readlink -f -- "$p"); '
                       'if [ "$r" = "$w" ]; then s=O; else case "$r" in "$w"/*) s=O;; *) s=X;; esac; fi; ')
        else:
            verdict = "else s=O; "
        script = ('w=$(readlink -f -- "$0"); i=0; for p in "$@"; do '
                  'if [ ! -e "$p" ]; then s=M; ' + verdict + 'fi; echo "@@$i $s"; i=$((i+1)); done')
        argv = " ".join(shlex.quote(a) for a in [script, within or "/", *paths])
        result = self.run(f"sh -c {argv}", timeout=60)
        found: dict[str, str] = {}
        for line in result.output_tail.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith("@@") and parts[0][2:].isdigit():
                index = int(parts[0][2:])
                if index < len(paths) and parts[1] in ("M", "L", "X", "O"):
                    found.setdefault(paths[index], parts[1])
        return found

    def _get_one(self, path: str, local: Path, timeout: float | None, refused: list[str]) -> list[Path]:
        import docker

        with tempfile.TemporaryFile() as buf:
            def fetch() -> None:
                try:
                    stream, _stat = self.client.api.get_archive(self.container_id, path)
                except docker.errors.NotFound:
                    return
                for chunk in stream:
                    buf.write(chunk)

            self._within(timeout, fetch, f"copying {path} from the instance")
            if buf.tell() == 0:
                return []
            buf.seek(0)
            written = []
            with tarfile.open(fileobj=buf, mode="r") as tar:
                members = []
                for member in tar.getmembers():
                    if member.isfile() or member.isdir():
                        members.append(member)
                    else:
                        refused.append(f"{posixpath.join(posixpath.dirname(path), member.name)} "
                                       "is not a plain file or directory (a link?): not copied")
                tar.extractall(local, members=members, filter="data")
                for member in members:
                    if member.isfile():
                        written.append(local / member.name)
        return written

    def _within(self, timeout: float | None, work, what: str) -> Any:
        """Run ``work`` in a thread and give up after ``timeout`` seconds (the Docker SDK
        has only per-read socket timeouts, not a deadline for a whole transfer)."""
        if timeout is None:
            return work()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                box["error"] = exc

        thread = threading.Thread(target=target, name="docker-copy", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise PhaseTimeoutError("copy", timeout, f"{what} did not finish within {timeout:.0f}s")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # -- ports -------------------------------------------------------------------
    def forward(self, remote_port: int, remote_host: str = "127.0.0.1") -> int:
        if self.network == "host" and remote_host in ("127.0.0.1", "localhost", "0.0.0.0"):
            return remote_port
        if remote_port in self.ports:
            return self.ports[remote_port]
        raise ConfigError(f"port {remote_port} of the container is not published",
                          hint="List it in the launch's ports, or use network: host.")

    def close(self) -> None:
        """Nothing to release: the Docker client belongs to the provider."""
