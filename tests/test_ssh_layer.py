"""The SSH layer against a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ephemera.errors import AuthError, TransientError
from ephemera.transport.ssh import (
    HostKeyChangedError,
    HostKeyPin,
    Target,
    connect,
    generate_keypair,
)
from ephemera.transport.ssh_remote import SSHRemote
from tests.fixtures.common import free_port

pytestmark = pytest.mark.sshd


@pytest.fixture
def target(sshd) -> Target:
    return Target(host=sshd.host, port=sshd.port, user=sshd.user, key_path=sshd.key_path)


@pytest.fixture
def remote(target):
    r = SSHRemote(target, connect_timeout=20)
    yield r
    r.close()


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every process below ``pid``."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True,
                         text=True).stdout
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.splitlines():
        p, pp, comm = line.split(None, 2)
        children.setdefault(int(pp), []).append((int(p), comm.strip()))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


class SessionFreezer:
    """Stops (SIGSTOP) the sshd session processes that appear after it is made, ``delay``
    seconds after start(); resumes them in stop(). Only our own test sshd's children."""

    def __init__(self, sshd_pid: int, delay: float) -> None:
        self.sshd_pid = sshd_pid
        self.delay = delay
        self.before = {p for p, _ in _descendants(sshd_pid)}
        self.stopped: list[int] = []
        self.thread = threading.Thread(target=self._freeze)

    def _freeze(self) -> None:
        time.sleep(self.delay)
        for pid, comm in _descendants(self.sshd_pid):
            if comm.startswith("sshd") and pid not in self.before:
                os.kill(pid, signal.SIGSTOP)
                self.stopped.append(pid)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.join()
        for pid in self.stopped:
            os.kill(pid, signal.SIGCONT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_run_streams_lines_exit_status_and_masks_env(remote, tmp_path):
    seen: list[str] = []
    log = tmp_path / "cmd.log"
    result = remote.run('echo "out $GREETING"; echo "err $TOKEN" >&2; exit 3',
                        env={"GREETING": "hi", "TOKEN": "s3cr3t-value"},
                        on_line=seen.append, log_path=log, timeout=30)
    assert result.exit_status == 3 and not result.ok and not result.timed_out
    assert "out hi" in seen and "err ***" in seen
    text = log.read_text()
    assert "s3cr3t-value" not in text and "s3cr3t-value" not in result.output_tail
    assert "err ***" in text
    ok = remote.run("pwd", cwd="/tmp", timeout=30)
    assert ok.ok and ok.output_tail.strip() == "/tmp"


@pytest.mark.timeout(60)
def test_env_values_stay_off_the_remote_command_line(remote):
    result = remote.run('cat /proc/$$/cmdline | tr "\\0" " "; echo; echo "$TOKEN" | wc -c',
                        env={"TOKEN": "never-on-argv-123"}, timeout=30)
    assert result.ok
    assert "never-on-argv" not in result.output_tail
    assert result.output_tail.strip().endswith(str(len("never-on-argv-123") + 1))


@pytest.mark.timeout(120)
def test_ten_mib_on_both_streams_does_not_deadlock(remote):
    counts = {"o": 0, "e": 0, "lines": 0}

    def on_line(line: str) -> None:
        # The two writers interleave on the combined stream, so count characters.
        counts["o"] += line.count("o")
        counts["e"] += line.count("e")
        counts["lines"] += 1

    gen = "head -c 10485760 /dev/zero | tr '\\0' {c} | fold -w 1024"
    cmd = f"({gen.format(c='o')}) & ({gen.format(c='e')}) >&2; wait"
    started = time.monotonic()
    result = remote.run(cmd, timeout=100, on_line=on_line)
    assert result.ok, result.output_tail[-300:]
    assert counts["o"] == 10485760 and counts["e"] == 10485760
    assert counts["lines"] >= 10240
    print(f"20 MiB over both streams in {time.monotonic() - started:.1f}s")


@pytest.mark.timeout(60)
def test_timeout_kills_the_remote_process_group(remote, tmp_path):
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    result = remote.run(f"sleep 300 & echo $! > {pidfile}; wait", timeout=2)
    assert result.timed_out and result.exit_status is None
    assert time.monotonic() - started < 15
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the remote command's child survived the timeout"


@pytest.mark.timeout(90)
def test_frozen_peer_fails_within_the_deadline(sshd, target, tmp_path):
    """SIGSTOP the sshd session processes of our own connection mid-command: the TCP
    connection stays up and nothing answers. run() must return at its timeout."""
    freezer = SessionFreezer(sshd.pid, delay=1.0)
    remote = SSHRemote(target, connect_timeout=5)
    assert remote.run("true", timeout=20).ok
    freezer.start()
    started = time.monotonic()
    try:
        result = remote.run("while true; do echo tick; sleep 0.2; done", timeout=4)
        elapsed = time.monotonic() - started
    finally:
        freezer.stop()
        remote.close()
    assert freezer.stopped, "no sshd session process found to freeze"
    assert result.timed_out
    assert elapsed < 4 + 12, f"run took {elapsed:.1f}s with a 4s timeout"
    assert "tick" in result.output_tail


@pytest.mark.timeout(60)
def test_host_key_pinned_on_first_contact_and_change_refused(sshd, target, tmp_path):
    pin_file = tmp_path / "host_key"
    pin = HostKeyPin(path=pin_file)
    client = connect(target, deadline=10, pin=pin)
    client.close()
    assert pin_file.read_text().split()[:2] == sshd.host_key_line.split()[:2]
    again = connect(target, deadline=10, pin=HostKeyPin(path=pin_file))
    again.close()
    _, other = generate_keypair(tmp_path / "other")
    started = time.monotonic()
    with pytest.raises(HostKeyChangedError, match="host key .* changed"):
        connect(target, deadline=20, pin=HostKeyPin(other))
    assert time.monotonic() - started < 5, "a changed host key must not be retried"


@pytest.mark.timeout(60)
def test_connect_retries_until_the_host_answers(sshd, target):
    """Nothing listens at first; a relay to the real sshd appears 2 s later."""
    port = free_port()

    def relay_later() -> None:
        time.sleep(2)
        srv = socket.create_server(("127.0.0.1", port))
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            return
        finally:
            srv.close()
        up = socket.create_connection((sshd.host, sshd.port))

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                b.close()
                a.close()

        threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()

    threading.Thread(target=relay_later, daemon=True).start()
    moved = Target(host=target.host, port=port, user=target.user, key_path=target.key_path)
    started = time.monotonic()
    client = connect(moved, deadline=20, pin=HostKeyPin(sshd.host_key_line))
    try:
        assert time.monotonic() - started >= 1.5
        _, out, _ = client.exec_command("echo up", timeout=10)
        assert out.read().strip() == b"up"
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_connect_gives_up_at_the_deadline(target):
    """A listener that accepts and never sends a banner."""
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    held: list[socket.socket] = []

    def accept() -> None:
        silent.settimeout(1)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                held.append(silent.accept()[0])
            except (TimeoutError, OSError):
                continue

    threading.Thread(target=accept, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(TransientError, match="within 4s"):
        connect(Target(host="127.0.0.1", port=port, user=target.user, key_path=target.key_path),
                deadline=4, attempt_timeout=2)
    assert time.monotonic() - started < 10
    silent.close()
    for s in held:
        s.close()


@pytest.mark.timeout(60)
def test_refused_key_is_an_auth_error(sshd, tmp_path):
    key, _ = generate_keypair(tmp_path / "k")
    with pytest.raises(AuthError, match="refused"):
        connect(Target(host=sshd.host, port=sshd.port, user=sshd.user, key_path=str(key)),
                deadline=2)


@pytest.mark.timeout(60)
def test_generated_key_logs_in(sshd, tmp_path):
    import paramiko

    key, public = generate_keypair(tmp_path / "run-key")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert public.startswith("ssh-ed25519 ")
    assert isinstance(paramiko.PKey.from_path(str(key)), paramiko.Ed25519Key)
    authorized = Path(sshd.key_path).parent / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + public + "\n")
    try:
        r = SSHRemote(Target(host=sshd.host, port=sshd.port, user=sshd.user, key_path=str(key)))
        assert r.run("echo in", timeout=20).output_tail.strip() == "in"
        r.close()
    finally:
        authorized.write_text(original)


@pytest.mark.timeout(60)
def test_put_and_get_files_dirs_and_globs(remote, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    script = src / "run.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    dest = tmp_path / "remote-side" / "upload"
    remote.put(src, str(dest), timeout=30)
    assert (dest / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()
    assert remote.run(f"{dest}/run.sh", timeout=10).output_tail.strip() == "ran"
    remote.put(src / "a.txt", str(tmp_path / "remote-side" / "single" / "a.txt"), timeout=30)
    assert (tmp_path / "remote-side" / "single" / "a.txt").read_text() == "alpha"

    back = tmp_path / "back"
    files = remote.get(str(dest / "a.txt"), back / "one", timeout=30)
    assert files == [back / "one" / "a.txt"] and files[0].read_text() == "alpha"
    tree = remote.get(str(dest), back / "tree", timeout=30)
    assert sorted(p.relative_to(back / "tree").as_posix() for p in tree) == [
        "upload/a.txt", "upload/run.sh", "upload/sub/b.bin"]
    assert (back / "tree" / "upload" / "sub" / "b.bin").read_bytes() == \
        (src / "sub" / "b.bin").read_bytes()
    globbed = remote.get(str(dest / "*.txt"), back / "glob", timeout=30)
    assert [p.name for p in globbed] == ["a.txt"]
    assert remote.get(str(dest / "missing.log"), back / "none", timeout=30) == []
    assert remote.get(str(dest / "*.nothing"), back / "none", timeout=30) == []
    assert not list((back).rglob("*.part"))


@pytest.mark.timeout(60)
def test_forward_reaches_a_service_on_the_remote_loopback(remote, tmp_path):
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_text("through the tunnel")
    port = free_port()
    handle = remote.start(f"python3 -m http.server {port} --bind 127.0.0.1",
                          cwd=str(tmp_path / "www"), log_file=str(tmp_path / "http.log"))
    try:
        assert remote.is_running(handle)
        local_port = remote.forward(port)
        assert local_port != port
        deadline = time.monotonic() + 20
        body = None
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local_port}/hello.txt",
                                            timeout=5) as resp:
                    body = resp.read().decode()
            except OSError:
                time.sleep(0.3)
        assert body == "through the tunnel"
    finally:
        remote.stop(handle, grace=2)
    assert not remote.is_running(handle)


@pytest.mark.timeout(60)
def test_commands_recorded_by_process_group(target, tmp_path):
    pgids = tmp_path / "pgids"
    r = SSHRemote(target, pgid_file=str(pgids))
    try:
        assert r.run("true", timeout=20).ok
        handle = r.start("sleep 30", log_file=str(tmp_path / "s.log"),
                         env={"API_TOKEN": "tok-on-env-only"})
        assert b"API_TOKEN=tok-on-env-only" in Path(f"/proc/{handle}/environ").read_bytes()
        assert b"tok-on-env-only" not in Path(f"/proc/{handle}/cmdline").read_bytes()
        recorded = pgids.read_text().split()
        assert handle in recorded and len(recorded) >= 2
        r.stop(handle, grace=1)
    finally:
        r.close()


@pytest.mark.timeout(60)
def test_proxy_jump_through_a_bastion(sshd, tmp_path):
    """The target is reached through a direct-tcpip channel opened on the bastion
    (here the same server plays both parts; the target address is its loopback)."""
    from ephemera.provider import Endpoint

    endpoint = Endpoint(host="127.0.0.1", port=sshd.port, user=sshd.user,
                        key_path=sshd.key_path,
                        proxy_jump=f"{sshd.user}@{sshd.host}:{sshd.port}")
    r = SSHRemote.from_endpoint(endpoint, connect_timeout=20)
    try:
        result = r.run('echo "via $SSH_CONNECTION"', timeout=20)
        assert result.ok
        # The inner connection arrives from the bastion itself (127.0.0.1 -> 127.0.0.1).
        assert result.output_tail.startswith("via 127.0.0.1 ")
        bastion = r._client._ephemera_bastion
        assert bastion is not None and bastion.get_transport().is_active()
    finally:
        r.close()
    assert not bastion.get_transport() or not bastion.get_transport().is_active()


@pytest.mark.timeout(90)
def test_download_from_a_frozen_peer_fails_in_time_and_leaves_no_file(sshd, target, tmp_path):
    from ephemera.errors import PhaseTimeoutError

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(64 * 1024 * 1024))
    freezer = SessionFreezer(sshd.pid, delay=0.3)
    remote = SSHRemote(target, connect_timeout=5)
    assert remote.run("true", timeout=20).ok
    freezer.start()
    started = time.monotonic()
    try:
        with pytest.raises((PhaseTimeoutError, TransientError)):
            remote.get(str(big), tmp_path / "back", timeout=4)
        elapsed = time.monotonic() - started
    finally:
        freezer.stop()
        remote.close()
    assert freezer.stopped, "no sshd session process found to freeze"
    assert elapsed < 4 + 10, f"download took {elapsed:.1f}s with a 4s deadline"
    back = tmp_path / "back"
    assert not (back / "big.bin").exists(), "a partial download was reported as a file"
    assert not list(back.glob("*.part"))
