"""Serving: vLLM's command and environment, its port, starting it, and the health wait
(with vLLM's last log line as progress and its log tail when it fails).
"""

from __future__ import annotations

import shlex
import socket
import time
from typing import TYPE_CHECKING

from ephemera.errors import (
    ServerFailedError,
)
from ephemera.lifecycle import suite_prepare, weights
from ephemera.lifecycle.faults import fault_point
from ephemera.lifecycle.server import (
    DEFAULT_PORT,
    build_server_command,
    check_health,
)
from ephemera.provider import (
    PortChoice,
)
from ephemera.spec.job import BUILTIN_CPU_IMAGE
from ephemera.transport.container import ContainerRemote
from ephemera.transport.remote import ShellRemote, is_running_command

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run

SERVER_LOG_TAIL = 50
HEALTH_POLL_SECONDS = 0.1   # readiness is noticed within a tenth of a second (a local request)
# While waiting: whether vLLM still runs and its last log line, first after a second
# (a bad argument ends it at once), then every few seconds.
FIRST_WATCH_SECONDS = 1.0
WATCH_SECONDS = 5.0
PREPARE_POLL_SECONDS = 1.0  # how often the health wait looks at suite.prepare



def server_env(run: Run) -> dict[str, str]:
    env = {**weights.server_env(run), **run.cache_env, **run.job.env, **run.job.server.env}
    if run.job.image.split(":")[0] == BUILTIN_CPU_IMAGE:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def start_server(run: Run, model_path: str) -> None:
    assert run.remote is not None

    bind = run.caps.server_bind
    if isinstance(run.remote, ContainerRemote) and run.remote.network == "bridge":
        bind = "0.0.0.0"  # inside the container; its port is published on the host's 127.0.0.1
    tp = run.plan.tensor_parallel_size if run.plan is not None else 1
    run.server_cmd = build_server_command(run.job, model_path=model_path, tensor_parallel_size=tp,
                                           python=run.python, host=bind, port=run.server_port())
    with run.phase("server_start"):
        run._log(f"vLLM: {run.server_cmd.shell}")
        run.server_handle = run.remote.start(run._with_path(run.server_cmd.shell),
                                               env=run.server_env(), cwd=run.workdir,
                                               log_file=f"{run.workdir}/logs/vllm.log")
    suite_prepare.start(run)  # suite.prepare runs during the health wait


def choose_port(run: Run) -> int:

    if run.job.server.port:
        return run.job.server.port
    if run.caps.port is PortChoice.FREE_HERE:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    if run.caps.port is PortChoice.FREE_ON_MACHINE and run.remote is not None:
        probe = run.remote.run("python3 -c 'import socket; s=socket.socket(); "
                                "s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])'", timeout=30)
        lines = probe.output_tail.strip().splitlines()
        if probe.ok and lines and lines[-1].isdigit():
            return int(lines[-1])
    return DEFAULT_PORT


def server_log_tail(run: Run, lines: int = SERVER_LOG_TAIL) -> str:
    if run.remote is None:
        return ""
    try:
        result = run.remote.run(f"tail -n {lines} {shlex.quote(run.workdir)}/logs/vllm.log", timeout=15)
        return run._redact(result.output_tail)
    except Exception as exc:  # noqa: BLE001
        return f"(could not read the server log: {exc})"


def watch(run: Run) -> tuple[bool, str]:
    """While waiting for health: whether the server still runs, and the progress note
    (vLLM's last log line, and the bytes of weights downloaded so far for hub models),
    in one command where the channel is a shell (each command costs the machine a
    process start while vLLM is starting on it)."""
    assert run.remote is not None and run.server_cmd is not None and run.server_handle
    hub = "" if any("/.models/" in a or "/ephemera-models/" in a or "/snapshots/" in a
                    for a in run.server_cmd.argv) else (
        '; du -sb "${HF_HOME:-$HOME/.cache/huggingface}" 2>/dev/null | cut -f1')
    shell = isinstance(run.remote, ShellRemote)
    alive = True if shell else run.remote.is_running(run.server_handle)
    first = f"{is_running_command(run.server_handle)}; " if shell else ""
    try:
        result = run.remote.run(f"{first}tail -n 1 {shlex.quote(run.workdir)}/logs/vllm.log{hub}",
                                 env=run.server_env(), timeout=10)
    except Exception:  # noqa: BLE001 - a progress note is never worth failing the run
        return (run.remote.is_running(run.server_handle) if first else alive,
                "vLLM: (log not readable yet)")
    lines = result.output_tail.strip().splitlines()
    if first:
        answer = lines.pop(0).strip() if lines else ""
        # No clear answer (a command cut short): ask on its own rather than guess.
        alive = answer == "yes" if answer in ("yes", "no") else run.remote.is_running(run.server_handle)
    size = lines.pop() if hub and lines and lines[-1].isdigit() else ""
    weights_note = f" [weights {int(size) / 2**30:.2f} GiB downloaded]" if size else ""
    return alive, f"vLLM{weights_note}: {run._redact(lines[-1][:200]) if lines else '(no output yet)'}"


def wait_healthy(run: Run) -> None:
    assert run.remote is not None and run.server_cmd is not None and run.server_handle
    deadline, seconds, by_job = run.phase_deadline("health", run.job.server.health_timeout)
    with run.phase("health", f"/health and /v1/models on port {run.server_cmd.port}"):
        local_port = run.remote.forward(run.server_cmd.port)
        base = f"http://127.0.0.1:{local_port}"
        run.base_url = base
        next_watch = time.monotonic() + FIRST_WATCH_SECONDS
        next_prepare_check = time.monotonic() + PREPARE_POLL_SECONDS
        last_detail = ""
        fault_point("health")
        while True:
            health = check_health(base, run.server_cmd.served_name, timeout=2.0)
            if health.ready:
                run._log(f"vLLM is ready at {base} (model {run.server_cmd.served_name})")
                return
            last_detail = health.detail
            now = time.monotonic()
            if now >= next_prepare_check:
                suite_prepare.poll(run)
                next_prepare_check = now + PREPARE_POLL_SECONDS
            if now >= next_watch:
                alive, note = watch(run)
                if not alive:
                    tail = run._server_log_tail()
                    raise ServerFailedError(
                        f"vLLM exited while starting. Last {SERVER_LOG_TAIL} lines of its log "
                        f"({run.artifacts_dir / 'vllm.log'}):\n{tail}")
                run.reporter.progress(note)
                next_watch = time.monotonic() + WATCH_SECONDS
            if now + HEALTH_POLL_SECONDS > deadline:
                tail = run._server_log_tail(20)
                raise run._timeout_error("health", seconds, by_job,
                                          f"vLLM did not become healthy (last check: {last_detail}). "
                                          f"Last lines of its log:\n{tail}")
            time.sleep(HEALTH_POLL_SECONDS)
