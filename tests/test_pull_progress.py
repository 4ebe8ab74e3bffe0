"""Progress during the long phases, against a loopback registry (Debian's
``docker-registry``): the image pull shows layers done / total, the health wait shows
the server's last log line, both as plain timestamped lines in CI and on a terminal
(rich's spinner, read through a pty). A cancel during a pull is not held: the run
stops and tears down at once. vLLM is not the point: the server is the stand-in."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fixtures.common import free_port, missing_component
from tests.fixtures.standin_targets import _env, _job
from tests.runlib import EPHEMERA, RunProcess

REGISTRY = "/usr/bin/docker-registry"
LAYERS = 3


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Debian's docker-registry on a free loopback port (Docker trusts 127.0.0.0/8 over
    plain HTTP); yields host:port and stops it by its pid."""
    if not Path(REGISTRY).exists():
        missing_component("Debian's docker-registry is not installed (apt-get install docker-registry)")
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n"
                      f"http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: warn\n")
    with (root / "registry.log").open("w") as log:
        proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError((root / "registry.log").read_text()) from None
            time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def pushed_image(registry, tmp_path_factory, docker_engine, cpu_base_image):
    """An image of the CPU base plus LAYERS small layers, in the registry only."""
    build = tmp_path_factory.mktemp("pull-image")
    lines = [f"FROM {cpu_base_image}"]
    for i in range(LAYERS):
        (build / f"file{i}").write_bytes(os.urandom(256 * 1024))
        lines.append(f"COPY file{i} /opt/pull-test/file{i}")
    (build / "Dockerfile").write_text("\n".join(lines) + "\n")
    ref = f"{registry}/ephemera-test/pull:{int(time.time())}"
    subprocess.run(["docker", "build", "-q", "-t", ref, str(build)], check=True,
                   capture_output=True, timeout=300)
    subprocess.run(["docker", "push", ref], check=True, capture_output=True, timeout=300)
    yield ref
    subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, timeout=120)


def _forget(ref: str) -> None:
    subprocess.run(["docker", "rmi", "-f", ref], capture_output=True, timeout=120)


class SlowRegistry:
    """A loopback proxy in front of the registry that holds each layer download for
    ``delay`` seconds (manifests pass at once): a pull that takes as long as we like."""

    def __init__(self, upstream: str, delay: float) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if "/blobs/" in self.path and outer.delay:
                    time.sleep(outer.delay)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                req = urllib.request.Request(f"http://{upstream}{self.path}", headers=headers,
                                             method=self.command)
                try:
                    reply = urllib.request.urlopen(req, timeout=60)
                except urllib.error.HTTPError as exc:
                    reply = exc
                body = reply.read() if self.command != "HEAD" else b""
                self.send_response(reply.status if hasattr(reply, "status") else reply.code)
                for key, value in reply.headers.items():
                    if key.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = _forward

            def log_message(self, *_args) -> None:
                return

        self.delay = delay
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_registry(registry):
    proxies: list[SlowRegistry] = []

    def make(delay: float) -> SlowRegistry:
        proxies.append(SlowRegistry(registry, delay))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def _through(proxy: SlowRegistry, ref: str) -> str:
    return proxy.address + ref[ref.index("/"):]


@pytest.mark.timeout(300)
def test_docker_provider_reports_layers_done_of_total(pushed_image):
    from ephemera_providers.docker import DockerProvider

    _forget(pushed_image)
    notes: list[str] = []
    assert DockerProvider().pull_image(pushed_image, notes.append) == pushed_image
    counts = [n.split(": ")[1] for n in notes if "layers" in n and n.startswith("pulling ")]
    assert counts, notes
    totals = {int(c.split("/")[1].split()[0]) for c in counts}
    assert len(totals - {max(totals)}) <= LAYERS and max(totals) >= LAYERS
    done = [int(c.split("/")[0]) for c in counts]
    assert done == sorted(done) and done[-1] == max(totals)
    assert notes[-1].startswith(f"pulled {pushed_image}: ")


def _standin_job(tmp_path: Path, image: str, *, slow_start: int = 0) -> tuple[Path, dict]:
    job = _job(tmp_path, "docker", image=image, python="python3",
               resources={"docker": {"network": "host"}})
    if slow_start:
        # A server that logs for a few seconds before it listens, like vLLM loading weights.
        server = tmp_path / "standin" / "vllm" / "entrypoints" / "openai" / "api_server.py"
        text = server.read_text().replace(
            "    server = ThreadingHTTPServer(",
            "    import time\n"
            f"    for step in range({slow_start}):\n"
            "        print(f'loading weights step {step}', flush=True)\n"
            "        time.sleep(1)\n"
            "    server = ThreadingHTTPServer(", 1)
        server.write_text(text)
    return job, _env(tmp_path)


def _containers(run_id: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=dev.ephemera.run-id={run_id}"],
                         capture_output=True, text=True, timeout=60).stdout
    return out.split()


@pytest.mark.timeout(300)
def test_plain_output_shows_pull_layers_and_the_servers_last_line(pushed_image, tmp_path):
    _forget(pushed_image)
    job, env = _standin_job(tmp_path, pushed_image, slow_start=8)
    run = RunProcess(job, env)
    code, result = run.finish(timeout=240)
    stderr = run.stderr
    assert code == 0, stderr[-3000:]
    pull_lines = [ln for ln in stderr.splitlines() if "pulling " in ln and " layers" in ln]
    assert pull_lines and all(ln.startswith("[") and "s]" in ln for ln in pull_lines), stderr
    assert "> pull: " in stderr and "ok pull (" in stderr
    waits = [ln for ln in stderr.splitlines() if "vLLM: loading weights step" in ln]
    assert waits, stderr[-3000:]
    assert stderr.index("> health") < stderr.index(waits[0]) < stderr.index("ok health")
    assert _containers(result["run_id"]) == []


def _run_on_a_terminal(job: Path, env: dict, timeout: float) -> tuple[int, str]:
    """`ephemera run` with its stderr on a pty (so rich draws its spinner); all it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*EPHEMERA, "run", str(job)], stdout=subprocess.DEVNULL,
                            stderr=slave, env={**env, "COLUMNS": "300", "TERM": "xterm"},
                            cwd=job.parent, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    if proc.poll() is None:
        proc.kill()
    code = proc.wait(timeout=30)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(300)
def test_terminal_spinner_shows_pull_and_health_progress(pushed_image, slow_registry, tmp_path):
    proxy = slow_registry(2.0)
    ref = _through(proxy, pushed_image)
    _forget(ref)
    _forget(pushed_image)   # its layers would be there already
    job, env = _standin_job(tmp_path, ref, slow_start=6)
    code, screen = _run_on_a_terminal(job, env, timeout=240)
    _forget(ref)
    assert code == 0, screen[-3000:]
    assert f"pulling {ref}: " in screen and " layers" in screen, screen[-3000:]
    assert "vLLM: loading weights step" in screen, screen[-3000:]


@pytest.mark.timeout(300)
def test_a_cancel_during_a_pull_stops_at_once(pushed_image, slow_registry, tmp_path):
    proxy = slow_registry(120.0)
    ref = _through(proxy, pushed_image)
    _forget(ref)
    _forget(pushed_image)
    job, env = _standin_job(tmp_path, ref)
    run = RunProcess(job, env)
    # Layers the engine has from other images count as done at once: any progress line
    # means the pull is under way (the slow registry holds the rest of it).
    run.wait_for(f"pulling {ref}: ", timeout=120)
    sent = time.monotonic()
    run.signal(signal.SIGTERM)
    code, result = run.finish(timeout=60)
    took = time.monotonic() - sent
    assert code == 128 + signal.SIGTERM, run.stderr[-3000:]
    assert took < 15, f"the run took {took:.1f}s to stop during a pull"
    assert result["status"] == "interrupted"
    assert "stopped pull" in run.stderr and "> provision" not in run.stderr
    assert _containers(result["run_id"]) == []
    state = Path(env["EPHEMERA_STATE_DIR"]) / "runs"
    assert not state.exists() or not list(state.glob("*.json"))
    shutil.rmtree(tmp_path / "standin", ignore_errors=True)
