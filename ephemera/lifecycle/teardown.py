"""Where instances are terminated. Used by ``ephemera run`` (always, in a finally
block), by ``ephemera down`` (from a state file, in a later process) and by
``ephemera reap`` (from labels).

The protocol with a provider: call ``terminate`` (idempotent) until ``poll`` says
TERMINATED, then call ``terminate`` once more so the provider can delete what can
only go after the instance (security groups, key pairs), then ask ``find`` for the
run's labels to verify that nothing is left.

Terminating never depends on the disk: the known instance is sent its terminate before
anything else, and writing the outcome (``record``, usually the run's state file) is
best effort, after the terminates. A write that fails is reported as a warning; it
does not make the teardown unverified, since the instance is gone either way (and a
state file left saying "active" only makes a later ``ephemera down`` check again).
"""

from __future__ import annotations

import shutil
import threading
from typing import TYPE_CHECKING

from ephemera.transport.container import ContainerRemote

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run



import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ephemera.errors import (
    ConfigError,
    IncompleteSearchError,
)
from ephemera.lifecycle.faults import fault_point
from ephemera.provider import (
    LABEL_RUN_ID,
    Instance,
    InstanceState,
    Provider,
)
from ephemera.transport.remote import Remote

Log = Callable[[str], None]


@dataclass
class TeardownResult:
    verified: bool
    terminated: list[str] = field(default_factory=list)   # instance ids
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # e.g. the outcome could not be saved

    @property
    def status(self) -> str:
        """The run's state-file status after this teardown."""
        return "terminated" if self.verified else "teardown-failed"


def _call_with_retries(action: Callable[[], object], *, what: str, deadline: float, log: Log,
                       problems: list[str]) -> bool:
    """Retry ``action`` with exponential backoff until it works or the deadline passes."""
    delay = 0.5
    attempt = 0
    while True:
        attempt += 1
        try:
            action()
            return True
        except ConfigError as exc:  # bad input (e.g. a damaged state file): retrying cannot help
            message = f"{what} refused: {exc}"
            problems.append(message)
            log(message)
            return False
        except Exception as exc:  # noqa: BLE001 - teardown must outlive any provider error
            message = f"{what} failed (attempt {attempt}): {type(exc).__name__}: {exc}"
            if time.monotonic() + delay > deadline:
                problems.append(message)
                log(message + "; giving up")
                return False
            log(message + f"; retrying in {delay:.1f}s")
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def terminate_and_verify(provider: Provider, instance: Instance, *, deadline: float,
                         log: Log, poll_interval: float = 0.5) -> tuple[bool, list[str]]:
    """Terminate one instance and wait (within ``deadline``, a monotonic time) until the
    provider confirms it is gone. Returns (confirmed, problems)."""
    problems: list[str] = []
    if not _call_with_retries(lambda: provider.terminate(instance), what=f"terminate {instance.id}",
                              deadline=deadline, log=log, problems=problems):
        return False, problems
    interval = poll_interval
    current = instance
    while True:
        try:
            current = provider.poll(current)
            if current.state == InstanceState.TERMINATED:
                break
        except Exception as exc:  # noqa: BLE001
            log(f"poll {instance.id} during teardown: {type(exc).__name__}: {exc}")
        if time.monotonic() + interval > deadline:
            problems.append(f"{instance.id} was not confirmed terminated before the teardown deadline "
                            f"(last state: {current.state.value})")
            return False, problems
        time.sleep(interval)
        interval = min(interval * 1.5, 5.0)
    # Final idempotent call: lets the provider delete what had to wait for the instance.
    _call_with_retries(lambda: provider.terminate(current), what=f"clean up after {instance.id}",
                       deadline=deadline, log=log, problems=problems)
    return True, problems


def _terminate_once(provider: Provider, instance: Instance, log: Log) -> None:
    """One terminate call, before anything else (listing, polling, the disk)."""
    try:
        provider.terminate(instance)
    except Exception as exc:  # noqa: BLE001 - terminate_and_verify retries it
        log(f"terminate {instance.id}: {type(exc).__name__}: {exc}; will retry")


def record_outcome(record: Callable[[str], object] | None, result: TeardownResult,
                   log: Log) -> None:
    """Best effort: save the teardown's outcome; a failure becomes a warning."""
    if record is None:
        return
    try:
        record(result.status)
    except Exception as exc:  # noqa: BLE001 - a full disk must not undo a verified teardown
        message = (f"could not record the teardown's outcome ({result.status}): "
                   f"{type(exc).__name__}: {exc}")
        result.warnings.append(message)
        log(message)


def teardown_run(provider: Provider, run_id: str, instance: Instance | None, *, timeout: float,
                 log: Log, record: Callable[[str], object] | None = None) -> TeardownResult:
    """Terminate everything that belongs to ``run_id``: the known instance and anything
    else carrying the run's label (e.g. an instance whose launch was cut short).

    ``record`` (optional) is called once at the end with the outcome ("terminated" or
    "teardown-failed"), typically to save the run's state file; if it raises, the
    result carries a warning and nothing else changes."""
    started = time.monotonic()
    deadline = started + timeout
    result = TeardownResult(verified=True)
    targets: dict[str, Instance] = {}
    if instance is not None:
        targets[instance.id] = instance
        log(f"terminating {instance.provider} instance {instance.id}")
        _terminate_once(provider, instance, log)
    try:
        found_by_label = provider.find({LABEL_RUN_ID: run_id})
    except IncompleteSearchError as exc:   # act on what it found; the rest is unknown
        found_by_label = exc.found
        log(f"could not look everywhere for run-id={run_id}: {exc}")
        result.verified = False
        result.problems.append(f"the search by label was incomplete: {exc}")
    except Exception as exc:  # noqa: BLE001 - still terminate the instance we know
        found_by_label = []
        log(f"could not list instances by label run-id={run_id}: {type(exc).__name__}: {exc}")
        result.verified = False
        result.problems.append(f"listing by label failed, so nothing else of the run is known: {exc}")
    for found in found_by_label:
        if found.state != InstanceState.TERMINATED:
            targets.setdefault(found.id, found)
    for target in targets.values():
        if instance is None or target.id != instance.id:
            log(f"terminating {target.provider} instance {target.id}")
    # Several targets end in parallel: each waits on its own instance's end.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(targets)))) as pool:
        outcomes = list(pool.map(
            lambda target: (target, terminate_and_verify(provider, target, deadline=deadline, log=log)),
            targets.values()))
    for target, (ok, problems) in outcomes:
        result.problems.extend(problems)
        if ok:
            result.terminated.append(target.id)
        else:
            result.verified = False
    # Verify by label: nothing of this run may be left, and the search must have looked
    # everywhere; a teardown that could not look is not verified.
    try:
        left = [i for i in provider.find({LABEL_RUN_ID: run_id}) if i.state != InstanceState.TERMINATED]
        if left:
            result.verified = False
            result.problems.append("still present after teardown: " + ", ".join(i.id for i in left))
    except Exception as exc:  # noqa: BLE001
        log(f"could not verify by label: {type(exc).__name__}: {exc}")
        result.verified = False
        result.problems.append(f"could not verify by label that nothing is left: {exc}")
    result.seconds = time.monotonic() - started
    record_outcome(record, result, log)
    return result


def close_quietly(remote: Remote) -> None:
    """Remove the run's container (on a machine's Docker) and close the channel. vLLM
    is not stopped gracefully: the provider ends every process of the run, and its
    log was collected already."""

    try:
        if isinstance(remote, ContainerRemote):
            remote.remove_container()
        remote.close()
    except Exception:  # noqa: BLE001
        pass


def teardown_stage(run: Run) -> bool:
    run._in_teardown = True
    if run.provider is None or run.state is None:
        return True
    left = run.deadline - time.monotonic()
    timeout = max(left, 120.0)  # never cut teardown short: a leaked machine costs more than a late exit
    with run.phase("teardown"):
        fault_point("teardown")
        run._write_state_best_effort("tearing-down")
        if run.remote is not None:
            # The provider ends every process of the run; this part must not hold up the
            # teardown when the peer stopped answering, hence the thread with a bound.

            closer = threading.Thread(target=close_quietly, args=(run.remote,), daemon=True)
            closer.start()

            # After a signal the runner kills us within seconds: the machine's end comes
            # first (the provider removes the run's containers and processes itself).
            wait = 20.0 if isinstance(run.remote, ContainerRemote) else 2.0
            closer.join(timeout=0.2 if run._signal else wait)
        result = teardown_run(run.provider, run.run_id, run.instance, timeout=timeout, log=run._log)
        run.teardown_result = result
        run.terminated_at = datetime.now(UTC)
        fault_point("terminated")
        if result.verified:
            run._write_state_best_effort("terminated")
            run._log(f"teardown verified: nothing of run {run.run_id} is left "
                      f"({', '.join(result.terminated) or 'no instance'})")
            if run.ssh_key_dir is not None:
                shutil.rmtree(run.ssh_key_dir, ignore_errors=True)
        else:
            run._write_state_best_effort("teardown-failed")
            run.reporter.error("teardown NOT verified: " + "; ".join(result.problems)
                                + f". Run `ephemera down {run.run_id}` to finish it.")
        return result.verified
