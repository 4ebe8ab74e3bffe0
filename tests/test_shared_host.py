"""On a shared ssh host the job's container is fenced in: the provider's bookkeeping in
the run directory is read-only to it (a suite that writes -1 into every file it can
reach kills nothing outside the run), and its network is a bridge of its own with the
server's port published on the host's 127.0.0.1 only, so services bound to the host's
loopback are out of its reach, unless the job asks for the host network.

Real sshd (unprivileged login user in the docker group), real Docker, the stand-in
server inside the built-in CPU image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.runlib import RunProcess

pytestmark = pytest.mark.timeout(300)

# Writes -1 into every file of the run directory it can write, tries to remove the
# bookkeeping, then tries the host's loopback (the sshd) and the server.
ATTACK = r"""
cd .. ;
for f in .pgids labels.json .watchdog; do
  if ( echo -1 > "$f" ) 2>/dev/null; then echo "wrote:$f"; else echo "refused-write:$f"; fi;
  if rm -f "$f" 2>/dev/null && [ ! -e "$f" ]; then echo "removed:$f"; else echo "kept:$f"; fi;
done ;
find . -type f -writable 2>/dev/null | while read -r f; do echo -1 >> "$f" 2>/dev/null; done ;
python3 - <<'PY'
import os, socket, urllib.request
try:
    socket.create_connection(("127.0.0.1", int(os.environ["HOST_SSHD_PORT"])), timeout=3).close()
    print("host-loopback:reached")
except OSError as exc:
    print("host-loopback:unreachable", type(exc).__name__)
base = os.environ["OPENAI_BASE_URL"].rsplit("/v1", 1)[0]
print("server:", urllib.request.urlopen(base + "/health", timeout=5).status)
PY
"""


def attack_job(target, sshd_port: int, network: str | None = None) -> None:
    yaml = YAML()
    data = yaml.load(target.job.read_text())
    data["suite"]["command"] = ATTACK
    data["suite"]["env"] = {"HOST_SSHD_PORT": str(sshd_port)}
    if network:
        data["resources"]["ssh"]["network"] = network
    with target.job.open("w") as fh:
        yaml.dump(data, fh)


def suite_lines(result: dict) -> list[str]:
    return (Path(result["artifacts_dir"]) / "suite.log").read_text().splitlines()


def test_container_cannot_touch_bookkeeping_nor_host_loopback(ssh_container_target, sshd):
    target = ssh_container_target
    attack_job(target, sshd.port)
    victim = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        run = RunProcess(target.job, target.env, *target.args)
        code, result = run.finish(timeout=240)
        assert code == 0, run.stderr[-3000:]
        lines = suite_lines(result)
        for name in (".pgids", "labels.json"):
            assert f"refused-write:{name}" in lines, lines
            assert f"kept:{name}" in lines, lines
        assert any(ln.startswith("host-loopback:unreachable") for ln in lines), lines
        assert "server: 200" in lines, lines
        assert victim.poll() is None, "teardown killed a process outside the run"
        assert target.leftovers(result["run_id"]) == []
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()


def test_job_may_ask_for_the_host_network(ssh_container_target, sshd):
    target = ssh_container_target
    attack_job(target, sshd.port, network="host")
    run = RunProcess(target.job, target.env, *target.args)
    code, result = run.finish(timeout=240)
    assert code == 0, run.stderr[-3000:]
    lines = suite_lines(result)
    assert "host-loopback:reached" in lines, lines
    assert "refused-write:.pgids" in lines, lines
    assert target.leftovers(result["run_id"]) == []
    assert json.loads(json.dumps(result))["status"] == "passed"
