"""The run controller: plan -> provision -> boot -> upload -> server start -> health
-> suite -> collect -> teardown -> report.

It owns every wait, deadline and retry, and the one guarantee users care most
about: teardown runs after success, failure, any exception, a phase timeout, the
job's deadline, SIGINT, SIGTERM and SIGHUP. A second signal does not abort the
teardown. The state file written before the launch lets ``ephemera down`` finish
the job from another process if this one is killed outright.
"""

from __future__ import annotations

import shlex
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ephemera import errors
from ephemera.errors import (
    EphemeraError,
    Interrupted,
    PhaseTimeoutError,
)
from ephemera.lifecycle import (
    cache_store,
    caches,
    collect,
    machine,
    prepare,
    provision,
    serving,
    suite,
    suite_prepare,
    teardown,
    upload,
    weights,
)
from ephemera.lifecycle.faults import fault_point, wrap_provider
from ephemera.lifecycle.phase_times import time_table
from ephemera.lifecycle.records import PhaseRecord, RunResult, new_run_id
from ephemera.lifecycle.server import ServerCommand, build_server_command
from ephemera.lifecycle.state import RunState, save_state
from ephemera.lifecycle.teardown import TeardownResult
from ephemera.masking import job_masker
from ephemera.progress import Reporter
from ephemera.provider import (
    Capabilities,
    Instance,
    LaunchSpec,
    Offer,
    Provider,
    Runs,
    format_time,
)
from ephemera.registry import get_provider, load_provider_class
from ephemera.results.benchmark import benchmark_phase
from ephemera.results.gates import judge_run, record
from ephemera.results.reporting import write_reports
from ephemera.sizing.plan import Plan, plan_job
from ephemera.spec.durations import format_duration
from ephemera.spec.job import BUILTIN_CPU_IMAGE, BUILTIN_MODELS, Job
from ephemera.spec.jobfile import LoadedJob
from ephemera.spec.settings import Settings
from ephemera.transport.remote import Remote


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
        self.suite_prepare: suite_prepare.Prepare | None = None
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
        self.base_url = ""                  # the server, as reached from this machine
        self.teardown_result: TeardownResult | None = None
        self.benchmark_result: Any = None   # ephemera.results.benchmark.BenchmarkResult
        self.judgement: Any = None          # ephemera.results.gates.Judgement
        self.weights: Any = None            # ephemera.lifecycle.weights.WeightsJob
        self.cache_env: dict[str, str] = {}  # the compile caches' environment for vLLM
        self.s3_caches: Any = None          # ephemera.lifecycle.cache_store.S3Caches
        self.model_dir: Path | None = None   # the local model the run serves, if any
        self.mounted_models: dict[str, str] = {}   # local model dir -> its read-only mount
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
            options = self.job.resources.model_dump(mode="json")
            self._caps = load_provider_class(self.provider_name).capabilities(options)
        return self._caps

    def make_plan(self) -> Plan:
        return plan_job(self.job, catalog=self.catalog, provider_name=self.provider_name)

    def _model_source(self) -> tuple[Path | None, str]:
        return prepare.model_source(self)

    def _prepare_environment(self) -> str:
        return prepare.prepare_environment(self)

    def _launch_spec(self, offer: Offer, image: str, public_key: str | None,
                     private_key: str | None) -> LaunchSpec:
        spec = provision.launch_spec(self, offer, image, public_key, private_key)
        return replace(spec, options={**spec.options, **cache_store.launch_options(self)})

    def provision(self, image: str) -> None:
        return provision.provision(self, image)

    def wait_queue(self) -> None:
        return provision.wait_queue(self)

    def upload(self, model_dir: Path | None) -> str:
        return upload.upload(self, model_dir)

    def _host_remote(self) -> Remote:
        return machine.host_remote(self)

    def server_env(self) -> dict[str, str]:
        return serving.server_env(self)

    def start_server(self, model_path: str) -> None:
        return serving.start_server(self, model_path)

    def server_port(self) -> int:
        """The job's port, or a free one where the machine is shared with other runs
        (chosen once per run)."""
        if self._port is None:
            self._port = self._choose_port()
        return self._port

    def _choose_port(self) -> int:
        return serving.choose_port(self)

    def _server_log_tail(self, lines: int = serving.SERVER_LOG_TAIL) -> str:
        return serving.server_log_tail(self, lines)

    def wait_healthy(self) -> None:
        return serving.wait_healthy(self)

    def suite_env(self) -> dict[str, str]:
        return suite.suite_env(self)

    def suite_command(self) -> str:
        return suite.suite_command(self)

    def run_suite(self) -> int:
        suite_prepare.wait(self)
        status = suite.run_suite(self)
        cache_store.save(self)   # caches kept in S3: what this run added, before teardown
        return status

    def _suite_line(self, line: str) -> None:
        return suite.suite_line(self, line)

    def _ensure_channel(self, budget: float) -> bool:
        return collect.ensure_channel(self, budget)

    def collect(self, budget: float, suspect_channel: bool = False) -> None:
        suite_prepare.settle(self, min(budget, 5.0) if suspect_channel else budget)
        return collect.collect(self, budget, suspect_channel)

    def teardown(self) -> bool:
        weights.close(self)
        return teardown.teardown_stage(self)

    # ---------------------------------------------------------------- main
    def dry_run(self) -> RunResult:
        with self.phase("plan"):
            self.plan = self.make_plan()
        uploaded = self.job.model.id in BUILTIN_MODELS or (self.loaded.base_dir / self.job.model.id).is_dir()
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
            started_at=self.started_at,
            server_command=self.masker(self.server_cmd.shell) if self.server_cmd else None,
            suite_command=self.masker(self.suite_command()),
        )

    def execute(self) -> RunResult:
        self.reporter.info(f"run {self.run_id}: job {self.job.name}"
                           + (f" (tier {self.loaded.tier})" if self.loaded.tier else "")
                           + f" on provider {self.provider_name}")
        status, code, message = "error", errors.EXIT_INFRA, ""
        failure: BaseException | None = None
        self._install_signals()
        try:
            try:
                cache_store.check(self)   # before anything is planned or launched
                with self.phase("plan"):
                    self.plan = self.make_plan()
                    o = self.plan.offer
                    self._log(f"plan: {o.instance_type} ({o.gpu_count} x {o.gpu or 'CPU'}), "
                              f"tensor parallel {self.plan.tensor_parallel_size}, ${o.price_per_hour:.4f}/h")
                self.provider = wrap_provider(get_provider(self.provider_name))
                with self.phase("local_prepare"):
                    image = self._prepare_environment()
                    model_dir, hub_id = self._model_source()
                    self.model_dir = model_dir
                weights.start_local(self, hub_id)   # beside the pull, on this machine's engine
                image = prepare.pull_before_launch(self, image)
                # Building the built-ins on first use (minutes, once per machine) is not the
                # job's time: its deadline starts now, right before anything is launched.
                self._start_clock()
                self.provision(image)
                self.remote = machine.connect(self, image)
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
        self.print_times()
        return result

    def print_times(self) -> None:
        """Where the run's time went, phase by phase (overlaps show on the time line)."""
        if self.launched_at is None:
            return
        self.reporter.info("where the time went:")
        for line in time_table(self.phases, self.started_at).splitlines():
            self.reporter.info(f"  {line}")

    def serve_and_test(self, model_dir: Path | None, hub_id: str) -> int:
        """Upload, start vLLM, wait for health, run the suite and the benchmark; the
        suite's exit status. (A subclass may serve several models one after another.)"""
        uploaded = self.upload(model_dir)
        model_path = uploaded or weights.finish(self, hub_id)
        self.cache_env = caches.prepare(self, model_path)
        self.start_server(model_path)
        self.wait_healthy()
        suite_status = self.run_suite()
        if self.job.benchmark is not None:
            self.benchmark_result = benchmark_phase(self)
        return suite_status

    def judge(self, status: str, code: int, message: str) -> tuple[str, int, str]:
        """The verdict once the results and gates are known (ephemera.results.gates)."""
        return judge_run(self, status, code, message)

    def record_judgement(self) -> dict[str, Any] | None:
        return record(self)

    # ---------------------------------------------------------------- report
    def report(self, result: RunResult) -> dict[str, Any] | None:
        """Cost of the run: per-second billing from launch to verified termination."""
        if self.launched_at is None:
            return None
        fault_point("report")
        try:
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
