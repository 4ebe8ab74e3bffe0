"""The suite's prepare stage: ``suite.prepare``, work that needs no server (installs,
downloads), started detached right after vLLM so it runs during the health wait.

It runs where the suite runs (the ``suite.image`` container when set, else the job's
container or the machine), in the suite's directory and environment, with its own
phase (``prepare``), log (``suite-prepare.log`` in the artifacts) and timeout
(``suite.prepare_timeout``). The controller does the waiting: the health loop calls
:func:`poll`, and :func:`wait` holds the suite until the prepare has ended. A failure
stops the server and fails the run at once.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ephemera.errors import Interrupted, RemoteCommandError
from ephemera.lifecycle.records import PhaseRecord
from ephemera.lifecycle.suite import suite_place
from ephemera.transport.remote import Remote

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run

PHASE = "prepare"
LOG_NAME = "suite-prepare.log"
POLL_SECONDS = 0.25        # while the suite waits for it
TAIL_LINES = 30


@dataclass
class Prepare:
    """A prepare step that was started: where, its process group, its phase."""

    remote: Remote
    handle: str
    record: PhaseRecord
    deadline: float
    seconds: float
    by_job: bool
    docker: str = ""            # set when it runs in a sibling container (suite.image)
    log_fetched: bool = False

    @property
    def done(self) -> bool:
        return self.record.ended_at is not None


def paths(run: Run) -> tuple[str, str]:
    """(its log, the file its exit status goes to) on the machine."""
    return f"{run.workdir}/logs/{LOG_NAME}", f"{run.workdir}/logs/suite-prepare.status"


def command_line(run: Run) -> str:
    """The prepare commands, one after another, stopping at the first that fails."""
    steps = run.job.suite.prepare
    return " && ".join(f"( {step} )" for step in steps) if len(steps) > 1 else steps[0]


def start(run: Run) -> None:
    """Start ``suite.prepare`` detached (no-op without one); call right after the server."""
    run.suite_prepare = None
    if not run.job.suite.prepare:
        return
    assert run.remote is not None
    deadline, seconds, by_job = run.phase_deadline(PHASE, run.job.suite.prepare_timeout)
    log, status = paths(run)
    remote, command, cwd, docker = suite_place(run, command_line(run), "prepare")
    # The exit status goes to a file as the last step: present means ended, and how.
    command = f"{run._with_path(command)}; echo $? > {shlex.quote(status)}"
    record = PhaseRecord(name=PHASE, started_at=datetime.now(UTC))
    run.phases.append(record)
    run._log(f"> {PHASE}: {len(run.job.suite.prepare)} command(s) while vLLM starts "
             f"(log: {LOG_NAME})")
    handle = remote.start(f"rm -f {shlex.quote(status)}; {command}", env=run.suite_env(),
                          cwd=cwd, log_file=log)
    run.suite_prepare = Prepare(remote, handle, record, deadline, seconds, by_job, docker)


def poll(run: Run) -> None:
    """Check a running prepare once: finished (ok), failed (stops the server and raises)
    or out of time (raises). Called from the health wait."""
    prep: Prepare | None = run.suite_prepare
    if prep is None or prep.done:
        return
    if prep.remote.is_running(prep.handle):
        if time.monotonic() > prep.deadline:
            _stop(run, prep)
            _end(run, prep, ok=False)
            raise run._timeout_error(PHASE, prep.seconds, prep.by_job,
                                     f"suite.prepare was stopped; {_log_note(run)}")
        return
    code = _exit_status(run, prep)
    _end(run, prep, ok=code == 0)
    if code == 0:
        return
    tail = _log_tail(run, prep)
    if run.remote is not None and run.server_handle:
        run.remote.stop(run.server_handle, grace=2.0)
    what = f"exit status {code}" if code is not None else "ended without an exit status (killed?)"
    raise RemoteCommandError(
        f"suite.prepare failed ({what}); the server was stopped. Last lines of its log "
        f"({_log_note(run)}):\n{tail}", exit_status=code, output_tail=tail)


def wait(run: Run) -> None:
    """Hold the suite until the prepare has ended (raises as :func:`poll` does)."""
    prep: Prepare | None = run.suite_prepare
    if prep is None or prep.done:
        return
    run._log(f"waiting for {PHASE} (suite.prepare) to finish")
    while not prep.done:
        poll(run)
        if not prep.done:
            time.sleep(POLL_SECONDS)


def settle(run: Run, budget: float) -> None:
    """Before collecting: close a prepare the run left behind (the teardown ends its
    processes) and fetch its log, unless a signal asks for the machine's end first."""
    prep: Prepare | None = run.suite_prepare
    if prep is None:
        return
    if not prep.done:
        _end(run, prep, ok=False)
    if run._signal is None and not prep.log_fetched:
        _fetch_log(run, prep, timeout=max(0.5, min(10.0, budget / 4)))


# ---------------------------------------------------------------------- helpers
def _end(run: Run, prep: Prepare, *, ok: bool) -> None:
    prep.record.ended_at = datetime.now(UTC)
    prep.record.ok = ok
    run._log(f"{'ok' if ok else 'stopped'} {PHASE} ({prep.record.seconds:.1f}s)")
    _fetch_log(run, prep, timeout=30.0)


def _exit_status(run: Run, prep: Prepare) -> int | None:
    _log, status = paths(run)
    result = prep.remote.run(f"cat {shlex.quote(status)} 2>/dev/null", timeout=30)
    text = result.output_tail.strip()
    return int(text) if result.ok and text.isdigit() else None


def _stop(run: Run, prep: Prepare) -> None:
    prep.remote.stop(prep.handle, grace=2.0)
    if prep.docker:
        prep.remote.run(f"{prep.docker} rm -f ephemera-{run.run_id}-prepare >/dev/null 2>&1; true",
                        timeout=30)


def _fetch_log(run: Run, prep: Prepare, timeout: float) -> None:
    """Copy the log into the artifacts (masked with the rest when the run collects)."""
    log, _status = paths(run)
    try:
        run.artifacts_dir.mkdir(parents=True, exist_ok=True)
        if run.remote is not None:
            run.remote.get(log, run.artifacts_dir, timeout=timeout, within=run.workdir)
            prep.log_fetched = True
    except Interrupted:
        raise
    except Exception as exc:  # noqa: BLE001 - a log is never worth failing the run over
        run.reporter.warn(f"could not collect {log}: {type(exc).__name__}: {exc}")


def _log_tail(run: Run, prep: Prepare) -> str:
    local = run.artifacts_dir / LOG_NAME
    try:
        lines = local.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(its log could not be read)"
    return "\n".join(run._redact(line) for line in lines[-TAIL_LINES:])


def _log_note(run: Run) -> str:
    return f"its output is in {run.artifacts_dir / LOG_NAME}"
