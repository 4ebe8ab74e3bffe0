"""The run controller: plan -> provision -> boot -> upload -> server start -> health
-> suite -> collect -> teardown -> report.

It owns every wait, deadline and retry, and the one guarantee users care most
about: teardown runs after success, failure, any exception, a phase timeout, the
job's deadline, SIGINT, SIGTERM and SIGHUP. A second signal does not abort the
teardown. The state file written before the launch lets ``ephemera down`` finish
the job from another process if this one is killed outright.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from ephemera import errors
from ephemera.errors import (
    ConfigError,
    EphemeraError,
    Interrupted,
    PhaseTimeoutError,
    ServerFailedError,
)
from ephemera.lifecycle.faults import fault_point, wrap_provider
from ephemera.lifecycle.server import ServerCommand, build_server_command, check_health
from ephemera.lifecycle.state import RunState, save_state
from ephemera.lifecycle.teardown import TeardownResult
from ephemera.masking import job_masker
from ephemera.progress import Reporter
from ephemera.provider import (
    BuiltinImage,
    Capabilities,
    ImagePuller,
    Instance,
    LaunchSpec,
    Offer,
    PortChoice,
    Provider,
    Runs,
    format_time,
    make_labels,
)
from ephemera.sizing.plan import Plan
from ephemera.spec.job import BUILTIN_CPU_IMAGE, BUILTIN_TINY_MODEL, Job
from ephemera.spec.jobfile import LoadedJob
from ephemera.spec.settings import Settings
from ephemera.transport.remote import Remote

SERVER_LOG_TAIL = 50
HEALTH_POLL_SECONDS = 0.25  # readiness is noticed within a quarter of a second
HEALTH_PROGRESS_SECONDS = 3.0  # vLLM's last log line, while waiting for it


def new_run_id(job_name: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{job_name[:30].rstrip('-')}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


@dataclass
class PhaseRecord:
    name: str
    started_at: datetime
    ended_at: datetime | None = None
    ok: bool = False

    @property
    def seconds(self) -> float:
        end = self.ended_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()


@dataclass
class RunResult:
    run_id: str
    status: str                    # passed | failed | error | timeout | interrupted | dry-run
    exit_code: int
    job: str
    tier: str | None
    provider: str
    instance_type: str | None = None
    region: str | None = None
    artifacts_dir: str | None = None
    message: str = ""
    phases: list[PhaseRecord] = field(default_factory=list)
    plan: Plan | None = None
    cost: dict[str, Any] | None = None
    teardown_verified: bool | None = None
    server_command: str | None = None
    suite_command: str | None = None
    judgement: dict[str, Any] | None = None   # results, benchmark, gates (ephemera.results.gates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "exit_code": self.exit_code,
            "job": self.job,
            "tier": self.tier,
            "provider": self.provider,
            "instance_type": self.instance_type,
            "region": self.region,
            "artifacts_dir": self.artifacts_dir,
            "message": self.message,
            "phases": [{"name": p.name, "seconds": round(p.seconds, 3), "ok": p.ok} for p in self.phases],
            "cost": self.cost,
            "teardown_verified": self.teardown_verified,
            "server_command": self.server_command,
            "suite_command": self.suite_command,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            **(self.judgement or {}),
        }


class Run:
    """One execution of a job. Use ``execute()`` once."""

    def __init__(self, loaded: LoadedJob, *, settings: Settings, reporter: Reporter,
                 provider_name: str | None = None, catalog: Path | None = None,
                 run_id: str | None = None) -> None:
        self.loaded = loaded
        self.job: Job = loaded.job
        self.settings = settings
        self.reporter = reporter
        self.provider_name = provider_name or self.job.provider_name(settings.default_provider)
        self.catalog = catalog
        self.run_id = run_id or new_run_id(self.job.name)
        self.started_at = datetime.now(UTC)
        self._start_clock()
        self.artifacts_dir = (settings.artifacts_dir / self.run_id).resolve()
        self.phases: list[PhaseRecord] = []
        self.provider: Provider | None = None
        self.instance: Instance | None = None
        self.offer: Offer | None = None
        self.plan: Plan | None = None
        self._caps: Capabilities | None = None
        self.remote: Remote | None = None
        self.server_handle: str | None = None
        self.state: RunState | None = None
        self.launched_at: datetime | None = None
        self.terminated_at: datetime | None = None
        self.ssh_key_dir: Path | None = None
        self.workdir = ""
        self.python = self.job.server.python
        self._port: int | None = None
        self.path_prefix: str | None = None
        self._signal: int | None = None
        self._in_teardown = False
        self._defer_signals = False
        self._pending_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self.server_cmd: ServerCommand | None = None
        self.teardown_result: TeardownResult | None = None
        self.benchmark_result: Any = None   # ephemera.results.benchmark.BenchmarkResult
        self.judgement: Any = None          # ephemera.results.gates.Judgement
        # One masker for everything the run prints and writes (ephemera.masking).
        self.masker = job_masker(loaded, warn=reporter.warn)
        reporter.masker = self.masker

    def _start_clock(self) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + self.job.timeout
        # Leave room for collect + teardown inside the job's deadline.
        self.teardown_reserve = min(max(30.0, 0.2 * self.job.timeout), 300.0)
        self.work_deadline = self.deadline - self.teardown_reserve

    # ---------------------------------------------------------------- signals
    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._in_teardown:
            self.reporter.warn(f"{name} received during teardown: teardown continues (it is what stops the billing)")
            return
        if self._signal is not None:
            self.reporter.warn(f"{name} received again: skipping to teardown")
            if self._phase_name() == "collect":
                raise Interrupted(signum, name)
            return
        self._signal = signum
        if self._defer_signals:
            self._pending_signal = signum
            self.reporter.warn(f"{name} received: stopping after the launch call returns, then tearing down")
            return
        self.reporter.warn(f"{name} received: stopping and tearing down")
        raise Interrupted(signum, name)

    def _install_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    @contextmanager
    def _deferred_signals(self) -> Iterator[None]:
        """Hold signals while a launch call is in flight, so its result is recorded."""
        self._defer_signals = True
        try:
            yield
        finally:
            self._defer_signals = False
        if self._pending_signal is not None:
            signum, self._pending_signal = self._pending_signal, None
            raise Interrupted(signum, signal.Signals(signum).name)

    # ---------------------------------------------------------------- phases
    def _phase_name(self) -> str | None:
        open_phases = [p for p in self.phases if p.ended_at is None]
        return open_phases[-1].name if open_phases else None

    @contextmanager
    def phase(self, name: str, detail: str = "") -> Iterator[PhaseRecord]:
        record = PhaseRecord(name=name, started_at=datetime.now(UTC))
        self.phases.append(record)
        try:
            with self.reporter.phase(name, detail):
                yield record
            record.ok = True
        finally:
            record.ended_at = datetime.now(UTC)

    def phase_deadline(self, phase: str, seconds: float | None) -> tuple[float, float, bool]:
        """(deadline, seconds allowed, limited_by_job) for a phase with its own timeout."""
        now = time.monotonic()
        own = now + seconds if seconds else self.work_deadline
        if own <= self.work_deadline:
            return own, seconds or (self.work_deadline - now), False
        return self.work_deadline, max(0.0, self.work_deadline - now), True

    def _timeout_error(self, phase: str, seconds: float, by_job: bool, what: str) -> PhaseTimeoutError:
        if by_job:
            from ephemera.spec.durations import format_duration

            return PhaseTimeoutError(phase, seconds,
                                     f"the job's deadline ({format_duration(self.job.timeout)}, "
                                     f"teardown included) ran out during phase '{phase}': {what}")
        return PhaseTimeoutError(phase, seconds, f"phase '{phase}' ran out after {seconds:.0f}s: {what}")

    # ---------------------------------------------------------------- helpers
    def _log(self, message: str) -> None:
        self.reporter.info(message)

    def _redact(self, line: str) -> str:
        return self.masker(line)

    def _write_state(self, status: str) -> None:
        if self.state is None:
            return
        self.state.status = status
        self.state.instance = self.instance
        if self.offer is not None:   # for `ephemera ls`: the cost so far
            self.state.extra["price_per_hour"] = self.offer.price_per_hour
        # For `ephemera logs`: the job, so it can mask what the run's secrets would show.
        self.state.extra["job_file"] = str(self.loaded.path)
        self.state.extra["tier"] = self.loaded.tier
        save_state(self.settings.state_dir, self.state)
        fault_point(f"state-{status}")

    def _write_state_best_effort(self, status: str) -> None:
        """During teardown the state file is a record, not a precondition: a full disk
        or a read-only state directory must not stop anything from being terminated."""
        try:
            self._write_state(status)
        except Exception as exc:  # noqa: BLE001
            self.reporter.warn(f"could not write the state file ({status}): {type(exc).__name__}: {exc}")

    def _with_path(self, command: str) -> str:
        if self.path_prefix:
            return f'export PATH={shlex.quote(self.path_prefix)}:"$PATH"; {command}'
        return command

    def _time_left(self, phase: str) -> float:
        """Seconds until the work deadline, for a call that takes a timeout; none left is
        the job's deadline running out in ``phase``."""
        left = self.work_deadline - time.monotonic()
        if left <= 0:
            raise self._timeout_error(phase, self.job.timeout, True, "no time left")
        return left

    def _check_stop(self) -> None:
        if time.monotonic() > self.work_deadline:
            raise self._timeout_error(self._phase_name() or "run", self.job.timeout, True, "no time left")

    # ---------------------------------------------------------------- stages
    @property
    def caps(self) -> Capabilities:
        """What the provider declares about its machines, for this job's resources."""
        if self._caps is None:
            from ephemera.registry import load_provider_class

            options = self.job.resources.model_dump(mode="json")
            self._caps = load_provider_class(self.provider_name).capabilities(options)
        return self._caps

    def make_plan(self) -> Plan:
        from ephemera.sizing.plan import plan_job

        return plan_job(self.job, catalog=self.catalog, provider_name=self.provider_name)

    def _model_source(self) -> tuple[Path | None, str]:
        """(local directory to upload or None, what vLLM loads when it is not uploaded)."""
        model_id = self.job.model.id
        if model_id == BUILTIN_TINY_MODEL:
            from ephemera.builtins.tiny_model import ensure_tiny_model

            return ensure_tiny_model(self._log), ""
        candidate = Path(model_id).expanduser()
        if not candidate.is_absolute():
            candidate = self.loaded.base_dir / candidate
        if candidate.is_dir():
            return candidate, ""
        return None, model_id

    def _prepare_environment(self) -> str:
        """Resolve the image for the provider (building the built-in CPU one when asked).
        Returns the image to launch."""
        image = self.job.image
        builtin = image.split(":")[0] == BUILTIN_CPU_IMAGE
        if self.job.suite.image and self.caps.runs is not Runs.MACHINE:
            raise ConfigError(f"suite.image: a separate suite image runs beside the server on a machine's "
                              f"Docker (providers ssh, aws, slurm); the {self.provider_name} provider runs the "
                              f"suite in the job's image: drop suite.image or use suite.setup")
        if self.caps.runs is Runs.THIS_MACHINE:
            if builtin:
                from ephemera.builtins.cpu_env import ensure_cpu_env

                python = Path(ensure_cpu_env(self._log))
                self.python = str(python)
                self.path_prefix = str(python.parent)
            elif image != "host":
                raise ConfigError(f"image: the local provider runs on this machine; use 'host' (vLLM installed "
                                  f"here) or '{BUILTIN_CPU_IMAGE}' (the built-in CPU environment), not '{image}'")
            return image
        if builtin:
            if self.caps.builtin_image is BuiltinImage.LOCAL_ENGINE:
                from ephemera.builtins.cpu_image import ensure_cpu_image

                image = ensure_cpu_image(self._log)
                self.python = "python3"
                return image
            # Another machine's Docker must have the image already (it is built, not pulled).
            image = image if ":" in image else f"{image}:latest"
            self._log(f"image {image} must already exist on the machine's Docker "
                      "(build it there with `ephemera image build-cpu`)")
            self.python = "python3"
        return image

    def _launch_spec(self, offer: Offer, image: str, public_key: str | None,
                     private_key: str | None) -> LaunchSpec:
        expires_at = (datetime.now(UTC) + timedelta(seconds=self.job.timeout)
                      + timedelta(seconds=self.settings.expiry_grace_seconds))
        labels = make_labels(self.run_id, self.job.name, self.settings.owner, expires_at)
        labels.update({k: v for k, v in self.job.resources.tags.items() if k not in labels})
        tp = self.plan.tensor_parallel_size if self.plan is not None else 1
        options = self.job.resources.model_dump(mode="json")
        return LaunchSpec(
            run_id=self.run_id, job_name=self.job.name, offer=offer, image=image, labels=labels,
            expires_at=expires_at, ssh_public_key=public_key, ssh_private_key_path=private_key,
            disk_gib=self.plan.disk_gib, gpu_count=max(tp, offer.gpu_count) if offer.gpu_count else 0,
            ports=(self.job.server.port or 8000,), env={}, options=options,
        )

    def provision(self, image: str) -> None:
        from ephemera.lifecycle.provision import launch_with_failover, wait_ready

        assert self.provider is not None
        public_key = private_key = None
        if self.caps.needs_ssh_key:
            from ephemera.transport.ssh import generate_keypair

            self.ssh_key_dir = self.settings.state_dir / "keys" / self.run_id
            private_path, public_key = generate_keypair(self.ssh_key_dir)
            private_key = str(private_path)
        assert self.plan is not None
        offers = [self.plan.offer] + [c.offer for c in self.plan.runners_up]

        def before_launch(spec: LaunchSpec) -> None:
            if self.state is None:
                self.state = RunState(run_id=self.run_id, job=self.job.name, provider=self.provider_name,
                                      labels=dict(spec.labels), expires_at=spec.expires_at,
                                      ssh_key_path=private_key, artifacts_dir=str(self.artifacts_dir))
            else:
                self.state.labels = dict(spec.labels)
                self.state.expires_at = spec.expires_at
            self._write_state("launching")

        with self.phase("provision", f"{self.provider_name} {self.plan.offer.instance_type}"):
            with self._deferred_signals():
                self.launched_at = datetime.now(UTC)
                self.instance, self.offer = launch_with_failover(
                    self.provider, offers, lambda offer: self._launch_spec(offer, image, public_key, private_key),
                    log=self._log, before_launch=before_launch)
                self._write_state("active")
            self._log(f"launched {self.instance.id} ({self.offer.instance_type}, "
                      f"{self.offer.region or 'local'}); state file: {self.settings.state_dir / 'runs'}")
            if self.instance.message:   # e.g. a fallback from spot to on-demand, and why
                self._log(f"{self.instance.id}: {self.instance.message}")
        if self.instance.data.get("queued") == "yes":
            self.wait_queue()
        deadline, seconds, by_job = self.phase_deadline("boot", self.job.resources.boot_timeout)
        with self.phase("boot"):
            try:
                self.instance = wait_ready(self.provider, self.instance, deadline=deadline,
                                           phase_seconds=seconds, log=self._log)
            except PhaseTimeoutError as exc:
                raise self._timeout_error("boot", seconds, by_job, exc.message) from None
            self._write_state("active")
            fault_point("boot")

    def wait_queue(self) -> None:
        """A batch scheduler's queue (the instance says ``queued``): the time spent there
        is shown with the scheduler's reason, bounded by the provider's queue timeout (and
        the job's deadline) and not billed: billing starts when the wait ends."""
        from ephemera.provider import InstanceState

        assert self.provider is not None and self.instance is not None
        try:
            limit = float(self.instance.data.get("queue_timeout") or 0) or None
        except ValueError:
            limit = None
        deadline, seconds, by_job = self.phase_deadline("queue", limit)
        started = time.monotonic()
        try:
            with self.phase("queue", self.instance.message):
                while self.instance.state is InstanceState.PENDING:
                    if time.monotonic() + 2.0 > deadline:
                        raise self._timeout_error(
                            "queue", seconds, by_job, f"{self.instance.message} after "
                            f"{time.monotonic() - started:.0f}s; cancelled")
                    time.sleep(2.0)
                    self.instance = self.provider.poll(self.instance)
                    self.reporter.progress(f"queued {time.monotonic() - started:.0f}s: "
                                           f"{self.instance.message}")
                self._log(f"{self.instance.id} left the queue after "
                          f"{time.monotonic() - started:.0f}s ({self.instance.message})")
        finally:
            self.launched_at = datetime.now(UTC)

    def upload(self, model_dir: Path | None) -> str:
        assert self.remote is not None and self.instance is not None
        wd = self.workdir
        with self.phase("upload"):
            uploads = []
            for entry in self.job.suite.files:
                local = Path(entry) if os.path.isabs(entry) else self.loaded.base_dir / entry
                relative = Path(entry).name if os.path.isabs(entry) else os.path.normpath(entry)
                uploads.append((local, f"{wd}/suite/{relative}"))
            dirs = [f"{wd}/{d}" for d in ("suite", "artifacts", "logs", "model")]
            dirs += [os.path.dirname(target) for _, target in uploads]
            # Made by the login user on the machine (not as root inside a container), so
            # the uploads, which go in as that user, can write there.
            result = self._host_remote().run(
                "mkdir -p " + " ".join(shlex.quote(d) for d in dict.fromkeys(dirs)), timeout=60)
            if not result.ok:
                raise errors.RemoteCommandError(f"could not create the run directory {wd} on the instance: "
                                                f"{result.output_tail.strip()[-300:]}", exit_status=result.exit_status)
            for local, target in uploads:
                self.remote.put(local, target, timeout=self._time_left("upload"))
            if model_dir is not None:
                self.remote.put(model_dir, f"{wd}/model", timeout=self._time_left("upload"))
                return f"{wd}/model"
        return ""

    def _host_remote(self) -> Remote:
        """The channel to the machine itself: past the job's container when there is one."""
        from ephemera.transport.container import ContainerRemote

        assert self.remote is not None
        return self.remote.host if isinstance(self.remote, ContainerRemote) else self.remote

    def server_env(self) -> dict[str, str]:
        env = {**self.job.env, **self.job.server.env}
        if self.job.image.split(":")[0] == BUILTIN_CPU_IMAGE:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        return env

    def start_server(self, model_path: str) -> None:
        assert self.remote is not None
        from ephemera.transport.container import ContainerRemote

        bind = self.caps.server_bind
        if isinstance(self.remote, ContainerRemote) and self.remote.network == "bridge":
            bind = "0.0.0.0"  # inside the container; its port is published on the host's 127.0.0.1
        tp = self.plan.tensor_parallel_size if self.plan is not None else 1
        self.server_cmd = build_server_command(self.job, model_path=model_path, tensor_parallel_size=tp,
                                               python=self.python, host=bind, port=self.server_port())
        with self.phase("server_start"):
            self._log(f"vLLM: {self.server_cmd.shell}")
            self.server_handle = self.remote.start(self._with_path(self.server_cmd.shell),
                                                   env=self.server_env(), cwd=self.workdir,
                                                   log_file=f"{self.workdir}/logs/vllm.log")

    def server_port(self) -> int:
        """The job's port, or a free one where the machine is shared with other runs
        (chosen once per run)."""
        if self._port is None:
            self._port = self._choose_port()
        return self._port

    def _choose_port(self) -> int:
        from ephemera.lifecycle.server import DEFAULT_PORT

        if self.job.server.port:
            return self.job.server.port
        if self.caps.port is PortChoice.FREE_HERE:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return sock.getsockname()[1]
        if self.caps.port is PortChoice.FREE_ON_MACHINE and self.remote is not None:
            probe = self.remote.run("python3 -c 'import socket; s=socket.socket(); "
                                    "s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])'", timeout=30)
            lines = probe.output_tail.strip().splitlines()
            if probe.ok and lines and lines[-1].isdigit():
                return int(lines[-1])
        return DEFAULT_PORT

    def _server_log_tail(self, lines: int = SERVER_LOG_TAIL) -> str:
        if self.remote is None:
            return ""
        try:
            result = self.remote.run(f"tail -n {lines} {shlex.quote(self.workdir)}/logs/vllm.log", timeout=15)
            return self._redact(result.output_tail)
        except Exception as exc:  # noqa: BLE001
            return f"(could not read the server log: {exc})"

    def _startup_note(self) -> str:
        """vLLM's last log line, and the bytes of weights downloaded so far (hub models)."""
        assert self.remote is not None and self.server_cmd is not None
        hub = "" if f"{self.workdir}/model" in self.server_cmd.argv else (
            '; du -sb "${HF_HOME:-$HOME/.cache/huggingface}" 2>/dev/null | cut -f1')
        try:
            result = self.remote.run(f"tail -n 1 {shlex.quote(self.workdir)}/logs/vllm.log{hub}",
                                     env=self.server_env(), timeout=10)
        except Exception:  # noqa: BLE001 - a progress note is never worth failing the run
            return "vLLM: (log not readable yet)"
        lines = result.output_tail.strip().splitlines()
        size = lines.pop() if hub and lines and lines[-1].isdigit() else ""
        weights = f" [weights {int(size) / 2**30:.2f} GiB downloaded]" if size else ""
        return f"vLLM{weights}: {self._redact(lines[-1][:200]) if lines else '(no output yet)'}"

    def wait_healthy(self) -> None:
        assert self.remote is not None and self.server_cmd is not None and self.server_handle
        deadline, seconds, by_job = self.phase_deadline("health", self.job.server.health_timeout)
        with self.phase("health", f"/health and /v1/models on port {self.server_cmd.port}"):
            local_port = self.remote.forward(self.server_cmd.port)
            base = f"http://127.0.0.1:{local_port}"
            self.base_url = base
            next_alive_check = 0.0
            next_progress = time.monotonic() + HEALTH_PROGRESS_SECONDS
            last_detail = ""
            fault_point("health")
            while True:
                health = check_health(base, self.server_cmd.served_name, timeout=2.0)
                if health.ready:
                    self._log(f"vLLM is ready at {base} (model {self.server_cmd.served_name})")
                    return
                last_detail = health.detail
                now = time.monotonic()
                if now >= next_progress:
                    next_progress = now + HEALTH_PROGRESS_SECONDS
                    self.reporter.progress(self._startup_note())
                if now >= next_alive_check:
                    if not self.remote.is_running(self.server_handle):
                        tail = self._server_log_tail()
                        raise ServerFailedError(
                            f"vLLM exited while starting. Last {SERVER_LOG_TAIL} lines of its log "
                            f"({self.artifacts_dir / 'vllm.log'}):\n{tail}")
                    next_alive_check = now + 2.0
                if now + HEALTH_POLL_SECONDS > deadline:
                    tail = self._server_log_tail(20)
                    raise self._timeout_error("health", seconds, by_job,
                                              f"vLLM did not become healthy (last check: {last_detail}). "
                                              f"Last lines of its log:\n{tail}")
                time.sleep(HEALTH_POLL_SECONDS)

    def suite_env(self) -> dict[str, str]:
        assert self.server_cmd is not None
        return {
            **self.job.env, **self.job.suite.env,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{self.server_cmd.port}/v1",
            "OPENAI_API_KEY": self.job.suite.env.get("OPENAI_API_KEY", "EMPTY"),
            "EPHEMERA_MODEL": self.server_cmd.served_name,
            "EPHEMERA_ARTIFACTS": f"{self.workdir}/artifacts",
            "EPHEMERA_RUN_ID": self.run_id,
        }

    def suite_command(self) -> str:
        parts = [*self.job.suite.setup, self.job.suite.command]
        return " && ".join(f"( {p} )" if len(parts) > 1 else p for p in parts)

    def run_suite(self) -> int:
        assert self.remote is not None
        deadline, seconds, by_job = self.phase_deadline("suite", self.job.suite.timeout)
        command = self.suite_command()
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        remote: Remote = self.remote
        cwd: str | None = f"{self.workdir}/suite"
        if self.job.suite.image:
            # Its own image, as a sibling container on the machine's Docker, sharing the
            # run directory and the host network (so the server is on 127.0.0.1).
            from ephemera.transport.container import ContainerRemote

            container = self.remote if isinstance(self.remote, ContainerRemote) else None
            remote = self._host_remote()
            env = self.suite_env()
            names = " ".join(f"-e {k}" for k in env)
            wd = shlex.quote(self.workdir)
            docker = container.docker_for(env) if container else "docker"
            user = container.user_flags() if container else ""
            network = container.sibling_flags() if container else "--network host "
            command = (f"{docker} run --rm --name ephemera-{self.run_id}-suite {network}"
                       "--security-opt no-new-privileges "
                       f"--label dev.ephemera.run-id={self.run_id} {user}{names} -v {wd}:{wd} "
                       f"-w {shlex.quote(cwd)} --entrypoint sh {shlex.quote(self.job.suite.image)} "
                       f"-c {shlex.quote(command)}")
            cwd = None
        with self.phase("suite", self.job.suite.command):
            with self.reporter.group(f"suite output ({self.job.suite.command})"):
                result = remote.run(
                    self._with_path(command), env=self.suite_env(), cwd=cwd,
                    timeout=max(1.0, deadline - time.monotonic()),
                    on_line=self._suite_line,
                    log_path=self.artifacts_dir / "suite.log")
            if self.job.suite.image and result.timed_out:
                remote.run(f"{docker} rm -f ephemera-{self.run_id}-suite >/dev/null 2>&1; true", timeout=30)
            if result.timed_out:
                raise self._timeout_error("suite", seconds, by_job,
                                          f"the suite was stopped; its output is in {self.artifacts_dir / 'suite.log'}")
            self._log(f"suite exited with status {result.exit_status}")
            return result.exit_status if result.exit_status is not None else 1

    def _suite_line(self, line: str) -> None:
        self.reporter.line(self._redact(line), "suite")
        fault_point("suite")

    def _ensure_channel(self, budget: float) -> bool:
        """Whether the channel answers (within ``budget`` seconds, at most 10). One that
        stopped answering (a frozen peer, a dropped tunnel) is replaced by a fresh
        connection before the logs are pulled, instead of waiting on the old one - but
        not after a signal: then the machine's end comes first, and the logs are given up."""
        assert self.remote is not None
        try:
            if self.remote.run("true", timeout=max(0.2, min(10.0, budget))).ok:
                return True
        except Interrupted:
            raise
        except Exception:  # noqa: BLE001
            pass
        if self.provider is None or self.instance is None:
            return False
        if self._signal is not None:
            self.reporter.warn("the channel to the instance is not answering: not collecting, "
                               "tearing down at once")
            return False
        self.reporter.warn("the channel to the instance stopped answering; reconnecting to collect the logs")
        old = self.remote
        try:
            fresh = self.provider.connect(self.instance)
        except Exception as exc:  # noqa: BLE001
            self.reporter.warn(f"reconnect failed: {type(exc).__name__}: {exc}")
            return False
        from ephemera.transport.container import ContainerRemote

        stale = old.host if isinstance(old, ContainerRemote) else old
        if isinstance(old, ContainerRemote):
            old.host = fresh
        else:
            self.remote = fresh
        import threading

        # Closing a transport whose peer is frozen may block: do it off the main thread.
        threading.Thread(target=stale.close, daemon=True).start()
        return True

    def collect(self, budget: float, suspect_channel: bool = False) -> None:
        if self.remote is None:
            return
        deadline = time.monotonic() + budget
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        wd = self.workdir
        wanted = [(f"{wd}/logs/vllm.log", self.artifacts_dir),
                  (f"{wd}/artifacts", self.artifacts_dir)]
        for entry in self.job.artifacts:
            remote_path = entry if entry.startswith("/") else f"{wd}/suite/{entry}"
            wanted.append((remote_path, self.artifacts_dir))
        with self.phase("collect"):
            fault_point("collect")
            if suspect_channel and not self._ensure_channel(0.5 if self._signal else budget):
                return
            for remote_path, local in wanted:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.reporter.warn(f"no time left to collect {remote_path}")
                    continue
                try:
                    refused: list[str] = []
                    got = self.remote.get(remote_path, local, timeout=left, within=wd, refused=refused)
                    for why in refused:
                        self.reporter.warn(f"not collected: {why}")
                    if not got and not remote_path.endswith("/artifacts"):
                        self.reporter.warn(f"artifact {remote_path} was not found on the instance")
                except Interrupted:
                    raise
                except Exception as exc:  # noqa: BLE001 - collect is best effort, teardown must follow
                    self.reporter.warn(f"could not collect {remote_path}: {type(exc).__name__}: {exc}")
            # The suite's output, the server's log and every text artifact (JUnit's
            # system-out included) are masked before anyone reads them.
            for path in self.masker.mask_tree(self.artifacts_dir):
                self.reporter.warn(f"could not check {path} for secrets (binary or too large): "
                                   "treat it as sensitive")
            self._log(f"artifacts in {self.artifacts_dir}")

    @staticmethod
    def _close_quietly(remote: Remote) -> None:
        """Remove the run's container (on a machine's Docker) and close the channel. vLLM
        is not stopped gracefully: the provider ends every process of the run, and its
        log was collected already."""
        from ephemera.transport.container import ContainerRemote

        try:
            if isinstance(remote, ContainerRemote):
                remote.remove_container()
            remote.close()
        except Exception:  # noqa: BLE001
            pass

    def teardown(self) -> bool:
        from ephemera.lifecycle.teardown import teardown_run

        self._in_teardown = True
        if self.provider is None or self.state is None:
            return True
        left = self.deadline - time.monotonic()
        timeout = max(left, 120.0)  # never cut teardown short: a leaked machine costs more than a late exit
        with self.phase("teardown"):
            fault_point("teardown")
            self._write_state_best_effort("tearing-down")
            if self.remote is not None:
                # The provider ends every process of the run; this part must not hold up the
                # teardown when the peer stopped answering, hence the thread with a bound.
                import threading

                closer = threading.Thread(target=self._close_quietly, args=(self.remote,), daemon=True)
                closer.start()
                from ephemera.transport.container import ContainerRemote

                # After a signal the runner kills us within seconds: the machine's end comes
                # first (the provider removes the run's containers and processes itself).
                wait = 20.0 if isinstance(self.remote, ContainerRemote) else 2.0
                closer.join(timeout=0.2 if self._signal else wait)
            result = teardown_run(self.provider, self.run_id, self.instance, timeout=timeout, log=self._log)
            self.teardown_result = result
            self.terminated_at = datetime.now(UTC)
            fault_point("terminated")
            if result.verified:
                self._write_state_best_effort("terminated")
                self._log(f"teardown verified: nothing of run {self.run_id} is left "
                          f"({', '.join(result.terminated) or 'no instance'})")
                if self.ssh_key_dir is not None:
                    import shutil

                    shutil.rmtree(self.ssh_key_dir, ignore_errors=True)
            else:
                self._write_state_best_effort("teardown-failed")
                self.reporter.error("teardown NOT verified: " + "; ".join(result.problems)
                                    + f". Run `ephemera down {self.run_id}` to finish it.")
            return result.verified

    # ---------------------------------------------------------------- main
    def dry_run(self) -> RunResult:
        with self.phase("plan"):
            self.plan = self.make_plan()
        uploaded = self.job.model.id == BUILTIN_TINY_MODEL or (self.loaded.base_dir / self.job.model.id).is_dir()
        model_path = "<run dir>/model" if uploaded else self.job.model.id
        python = self.job.server.python
        if self.caps.runs is Runs.THIS_MACHINE and self.job.image.split(":")[0] == BUILTIN_CPU_IMAGE:
            python = "<ephemera CPU environment>/bin/python"
        cmd = build_server_command(self.job, model_path=model_path,
                                   tensor_parallel_size=self.plan.tensor_parallel_size, python=python)
        result = self._result("dry-run", 0, "nothing was launched")
        result.server_command = self.masker(cmd.shell)
        return result

    def _result(self, status: str, code: int, message: str) -> RunResult:
        offer = self.offer or (self.plan.offer if self.plan is not None else None)
        return RunResult(
            run_id=self.run_id, status=status, exit_code=code, job=self.job.name, tier=self.loaded.tier,
            provider=self.provider_name, instance_type=offer.instance_type if offer else None,
            region=offer.region if offer else None,
            artifacts_dir=str(self.artifacts_dir) if self.artifacts_dir.exists() else None,
            message=self.masker(message), phases=self.phases, plan=self.plan,
            server_command=self.masker(self.server_cmd.shell) if self.server_cmd else None,
            suite_command=self.masker(self.suite_command()),
        )

    def execute(self) -> RunResult:
        from ephemera.registry import get_provider

        self.reporter.info(f"run {self.run_id}: job {self.job.name}"
                           + (f" (tier {self.loaded.tier})" if self.loaded.tier else "")
                           + f" on provider {self.provider_name}")
        status, code, message = "error", errors.EXIT_INFRA, ""
        failure: BaseException | None = None
        self._install_signals()
        try:
            try:
                with self.phase("plan"):
                    self.plan = self.make_plan()
                    o = self.plan.offer
                    self._log(f"plan: {o.instance_type} ({o.gpu_count} x {o.gpu or 'CPU'}), "
                              f"tensor parallel {self.plan.tensor_parallel_size}, ${o.price_per_hour:.4f}/h")
                self.provider = wrap_provider(get_provider(self.provider_name))
                with self.phase("prepare"):
                    image = self._prepare_environment()
                    model_dir, hub_id = self._model_source()
                if self.caps.pulls_before_launch:   # a cancel during a pull is not held
                    puller = cast(ImagePuller, self.provider)
                    with self.phase("pull", image):
                        image = puller.pull_image(image, self.reporter.progress)
                # Building the built-ins on first use (minutes, once per machine) is not the
                # job's time: its deadline starts now, right before anything is launched.
                self._start_clock()
                self.provision(image)
                assert self.instance is not None
                self.workdir = self.instance.workdir or f"/tmp/ephemera/{self.run_id}"
                self.remote = self.provider.connect(self.instance)
                if self.caps.runs is Runs.MACHINE and image != "host":
                    from ephemera.transport.container import ContainerRemote, prepare_host

                    with self.phase("image", image):
                        # As the login user: the run's directories, and how it reaches Docker.
                        docker, user = prepare_host(self.remote, self.workdir,
                                                    f"{self.instance.id} ({self.provider_name})")
                        network = self.caps.container_network
                        container = ContainerRemote(self.remote, f"ephemera-{self.run_id}", self.workdir,
                                                    self.run_id, docker=docker, user=user, network=network,
                                                    port=self.server_port() if network == "bridge" else None)
                        expires_at = self.state.expires_at if self.state else datetime.now(UTC) + timedelta(hours=1)
                        container.start_container(image, gpus=self.offer.gpu_count if self.offer else 0,
                                                  expires_at=expires_at, timeout=self._time_left("image"),
                                                  progress=self.reporter.progress)
                    self.remote = container
                self._check_stop()
                suite_status = self.serve_and_test(model_dir, hub_id)
                if suite_status == 0:
                    status, code, message = "passed", errors.EXIT_OK, "the suite passed"
                else:
                    status, code = "failed", errors.EXIT_TESTS_FAILED
                    message = f"the suite failed (exit status {suite_status}); output in {self.artifacts_dir / 'suite.log'}"
            except Interrupted as exc:
                failure = exc
                status, code, message = "interrupted", exc.exit_code, f"{exc.message}; tore down"
            except PhaseTimeoutError as exc:
                failure = exc
                status, code, message = "timeout", exc.exit_code, exc.message
            except EphemeraError as exc:
                failure = exc
                status, code, message = "error", exc.exit_code, str(exc)  # with its hint
            except Exception as exc:  # noqa: BLE001 - anything else still tears down
                failure = exc
                status, code = "error", errors.EXIT_INFRA
                message = f"internal error: {type(exc).__name__}: {exc}"
            if failure is not None:
                self.reporter.error(f"{status}: {message}")
            # Collect (short when interrupted: a CI runner kills us ~10 s after SIGINT).
            try:
                self.collect(budget=3.0 if self._signal else max(10.0, min(300.0, self.deadline - time.monotonic() - 60)),
                             suspect_channel=failure is not None)
            except Interrupted:
                self.reporter.warn("collect cut short by a second signal")
            except Exception as exc:  # noqa: BLE001
                self.reporter.warn(f"collect failed: {exc}")
        finally:
            verified = True
            try:
                verified = self.teardown()
            except BaseException as exc:  # noqa: BLE001
                verified = False
                self.reporter.error(f"teardown failed: {type(exc).__name__}: {exc}. "
                                    f"Run `ephemera down {self.run_id}` to finish it.")
            finally:
                self._restore_signals()
        status, code, message = self.judge(status, code, message)
        if not verified:
            code = errors.EXIT_TEARDOWN_FAILED
            message += f"; teardown NOT verified: run `ephemera down {self.run_id}`"
        result = self._result(status, code, message)
        result.teardown_verified = verified if self.state is not None else None
        result.cost = self.report(result)
        result.judgement = self.record_judgement()
        return result

    def serve_and_test(self, model_dir: Path | None, hub_id: str) -> int:
        """Upload, start vLLM, wait for health, run the suite and the benchmark; the
        suite's exit status. (A subclass may serve several models one after another.)"""
        uploaded = self.upload(model_dir)
        self.start_server(uploaded or hub_id)
        self.wait_healthy()
        suite_status = self.run_suite()
        if self.job.benchmark is not None:
            from ephemera.results.benchmark import benchmark_phase

            self.benchmark_result = benchmark_phase(self)
        return suite_status

    def judge(self, status: str, code: int, message: str) -> tuple[str, int, str]:
        """The verdict once the results and gates are known (ephemera.results.gates)."""
        from ephemera.results.gates import judge_run

        return judge_run(self, status, code, message)

    def record_judgement(self) -> dict[str, Any] | None:
        from ephemera.results.gates import record

        return record(self)

    # ---------------------------------------------------------------- report
    def report(self, result: RunResult) -> dict[str, Any] | None:
        """Cost of the run: per-second billing from launch to verified termination."""
        if self.launched_at is None:
            return None
        fault_point("report")
        try:
            from ephemera.results.reporting import write_reports

            return write_reports(self, result)
        except Exception as exc:  # noqa: BLE001 - the run already tore down; report what we can
            self.reporter.warn(f"cost report failed ({type(exc).__name__}: {exc}); "
                               "showing price x wall time instead")
            end = self.terminated_at or datetime.now(UTC)
            seconds = (end - self.launched_at).total_seconds()
            offer = self.offer or (self.plan.offer if self.plan is not None else None)
            price = offer.price_per_hour if offer is not None else 0.0
            return {"usd": round(price * seconds / 3600.0, 6),
                    "billed_seconds": round(seconds, 3), "price_per_hour": price,
                    "launched_at": format_time(self.launched_at), "terminated_at": format_time(end)}
