"""Named fault points: how the tests make a run fail at an exact step.

``EPHEMERA_FAULT=POINT[@ACTION][,POINT[@ACTION]...]`` makes the run die or fail when
it reaches POINT. ACTION is ``kill`` (SIGKILL this process: what a lost runner or the
OOM killer does; the default) or ``raise`` (one :class:`InjectedFault`, a transient
error, the first time the point is reached).

The points, in the order a run reaches them:
    state-launching   the state file was written, nothing launched yet
    provider.launch   the provider's launch call returned (the instance exists; the
                      state file does not name it yet)
    state-active      the state file names the instance
    provider.poll, provider.connect
    boot              the instance is ready
    health            the first health check of vLLM
    suite             the suite printed its first line
    collect           collecting starts
    teardown          teardown starts, before anything is terminated
    provider.terminate, provider.find
    state-tearing-down, state-terminated, state-teardown-failed
    terminated        teardown returned, before the state file says so
    report            the cost report starts

A point fires after the step it names, so ``provider.launch@raise`` is a launch whose
reply was lost after the instance was made. Without the variable nothing here runs
but one dictionary lookup per point.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from ephemera.errors import TransientError

ENV = "EPHEMERA_FAULT"
PROVIDER_CALLS = ("launch", "poll", "connect", "terminate", "find")
_fired: set[str] = set()


class InjectedFault(TransientError):
    """Raised at a fault point asked for with ``@raise``."""


def _wanted(point: str) -> str | None:
    spec = os.environ.get(ENV)
    if not spec:
        return None
    for item in spec.split(","):
        name, _, action = item.strip().partition("@")
        if name == point:
            return action or "kill"
    return None


def fault_point(point: str) -> None:
    """Die or raise here when ``EPHEMERA_FAULT`` names this point."""
    action = _wanted(point)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "raise" and point not in _fired:
        _fired.add(point)
        raise InjectedFault(f"injected fault at {point}")


class _FaultyProvider:
    """A provider whose calls pass through fault points named ``provider.<call>``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in PROVIDER_CALLS or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            fault_point(f"provider.{name}")
            return result

        return call


def wrap_provider(provider: Any) -> Any:
    """The provider itself, or (with ``EPHEMERA_FAULT`` set) one with fault points."""
    return _FaultyProvider(provider) if os.environ.get(ENV) else provider
