"""Detached starts under CPU load: the handle that ``start`` returns names a process
group that exists at once, so a check right after the start never takes a live server
for a dead one; a process that really died is still reported at once, with its log.

The same shell start runs on every provider that uses ``ShellRemote.start`` (local,
docker, ssh, aws); it is driven here through the local channel, and once over SSH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ephemera_providers.local import LocalRemote

from ephemera.transport.ssh import Target
from ephemera.transport.ssh_remote import SSHRemote

BUSY = "import time\nend = time.monotonic() + float({seconds})\nwhile time.monotonic() < end: pass\n"


@pytest.fixture
def busy_cpu():
    """Three spinning processes (more than the machine's cores here), each bounded in
    time, so rare interleavings between a start and the first check show up."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=60)]) for _ in range(3)]
    yield
    for proc in procs:
        proc.kill()
        proc.wait()


def _kill_groups(handles: list[str]) -> None:
    for handle in handles:
        try:
            os.killpg(int(handle), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(120)
def test_the_start_line_names_a_live_group_when_it_returns(tmp_path, busy_cpu):
    """The shell line every channel sends, checked in the same shell the instant it
    returns (the tightest window there is: printing ``$!`` from the parent failed
    this for most of 300 starts)."""
    from ephemera.transport.remote import detached_command

    line = detached_command("sleep 30", cwd=None, log_file=str(tmp_path / "logs" / "s.log"))
    script = (f'for i in $(seq 300); do pg=$({line}); echo "pg $pg"; '
              'kill -s 0 -- "-$pg" 2>/dev/null || echo "dead $pg"; done')
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=90).stdout
    handles = [w.split()[1] for w in out.splitlines() if w.startswith("pg ")]
    try:
        assert len(handles) == 300 and all(h.isdigit() for h in handles)
        dead = [w for w in out.splitlines() if w.startswith("dead")]
        assert dead == [], f"{len(dead)} of 300 starts returned before their group existed"
    finally:
        _kill_groups(handles)


@pytest.mark.timeout(120)
def test_every_detached_start_is_seen_running_at_once(tmp_path, busy_cpu):
    remote = LocalRemote(tmp_path, tmp_path / ".pgids")
    handles: list[str] = []
    false_dead = []
    started = time.monotonic()
    try:
        while len(handles) < 150 and time.monotonic() - started < 20:
            handle = remote.start("sleep 30", log_file=f"logs/s{len(handles)}.log")
            handles.append(handle)
            if not remote.is_running(handle):
                false_dead.append(handle)
        assert len(handles) >= 50, "too few starts to mean anything"
        assert false_dead == [], f"{len(false_dead)} of {len(handles)} live processes looked dead"
        # Every group was recorded by the command that started it.
        recorded = set((tmp_path / ".pgids").read_text().split())
        assert set(handles) <= recorded
    finally:
        _kill_groups(handles)


@pytest.mark.timeout(60)
def test_a_process_that_dies_at_once_is_reported_with_its_log(tmp_path, busy_cpu):
    remote = LocalRemote(tmp_path, tmp_path / ".pgids")
    handle = remote.start("echo 'bad argument --dtype' >&2; exit 3", log_file="logs/vllm.log")
    deadline = time.monotonic() + 5
    while remote.is_running(handle) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not remote.is_running(handle)
    assert "bad argument --dtype" in (tmp_path / "logs" / "vllm.log").read_text()


@pytest.mark.sshd
@pytest.mark.timeout(120)
def test_detached_starts_over_ssh_are_seen_running(sshd, tmp_path, busy_cpu):
    target = Target(host=sshd.host, port=sshd.port, user=sshd.user, key_path=sshd.key_path)
    remote = SSHRemote(target, pgid_file=str(tmp_path / ".pgids"))
    handles: list[str] = []
    try:
        for i in range(25):
            handle = remote.start("sleep 30", cwd=str(tmp_path), log_file=f"{tmp_path}/logs/{i}.log",
                                  env={"CANARY_TOKEN": "canary-in-env-7731"})
            handles.append(handle)
            assert remote.is_running(handle), f"start {i}: a live process looked dead"
        cmdline = Path(f"/proc/{handles[0]}/cmdline").read_bytes()
        assert b"canary-in-env-7731" not in cmdline
        assert b"CANARY_TOKEN=canary-in-env-7731" in Path(f"/proc/{handles[0]}/environ").read_bytes()
        assert set(handles) <= set((tmp_path / ".pgids").read_text().split())
    finally:
        _kill_groups(handles)
        remote.close()


@pytest.mark.timeout(120)
def test_what_a_finished_command_left_in_the_background_keeps_running(tmp_path, busy_cpu):
    """A command that ends normally is not followed by a kill of its process group: what
    it started in the background (with its output elsewhere) is still running when
    ``run`` returns, however the shell's own exit and the end of its output interleave
    (here the shell closes its output a little before it exits, as a daemonising script
    does)."""
    remote = LocalRemote(tmp_path, tmp_path / ".pgids")
    pids: list[int] = []
    dead = []
    try:
        for _ in range(20):
            result = remote.run("sleep 30 > /dev/null 2>&1 & echo $!; exec > /dev/null 2>&1; sleep 0.1",
                                timeout=30)
            assert result.exit_status == 0, result
            pid = int(result.output_tail.split()[-1])
            pids.append(pid)
            if not Path(f"/proc/{pid}").exists() or \
                    Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                dead.append(pid)
        assert dead == [], f"{len(dead)} of {len(pids)} background processes were killed"
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
