"""Where instances are terminated. Used by ``ephemera run`` (always, in a finally
block), by ``ephemera down`` (from a state file, in a later process) and by
``ephemera reap`` (from labels).

The protocol with a provider: call ``terminate`` (idempotent) until ``poll`` says
TERMINATED, then call ``terminate`` once more so the provider can delete what can
only go after the instance (security groups, key pairs), then ask ``find`` for the
run's labels to verify that nothing is left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ephemera.provider import LABEL_RUN_ID, Instance, InstanceState, Provider

Log = Callable[[str], None]


@dataclass
class TeardownResult:
    verified: bool
    terminated: list[str] = field(default_factory=list)   # instance ids
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


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


def teardown_run(provider: Provider, run_id: str, instance: Instance | None, *, timeout: float,
                 log: Log) -> TeardownResult:
    """Terminate everything that belongs to ``run_id``: the known instance and anything
    else carrying the run's label (e.g. an instance whose launch was cut short)."""
    started = time.monotonic()
    deadline = started + timeout
    result = TeardownResult(verified=True)
    targets: dict[str, Instance] = {}
    if instance is not None:
        targets[instance.id] = instance
    try:
        for found in provider.find({LABEL_RUN_ID: run_id}):
            if found.state != InstanceState.TERMINATED:
                targets.setdefault(found.id, found)
    except Exception as exc:  # noqa: BLE001 - still terminate the instance we know
        log(f"could not list instances by label run-id={run_id}: {type(exc).__name__}: {exc}")
        if instance is None:
            result.verified = False
            result.problems.append(f"no instance recorded and listing by label failed: {exc}")
    for target in targets.values():
        log(f"terminating {target.provider} instance {target.id}")
        ok, problems = terminate_and_verify(provider, target, deadline=deadline, log=log)
        result.problems.extend(problems)
        if ok:
            result.terminated.append(target.id)
        else:
            result.verified = False
    # Verify by label: nothing of this run may be left.
    try:
        left = [i for i in provider.find({LABEL_RUN_ID: run_id}) if i.state != InstanceState.TERMINATED]
        if left:
            result.verified = False
            result.problems.append("still present after teardown: " + ", ".join(i.id for i in left))
    except Exception as exc:  # noqa: BLE001
        log(f"could not verify by label: {type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    return result
