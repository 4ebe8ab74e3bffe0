"""Typed errors and the exit codes they map to at the CLI boundary.

Every error that ephemera raises on purpose is an :class:`EphemeraError`. The CLI
turns it into one paragraph on stderr and the exit code of its class; a traceback
is printed only with ``--debug``.
"""

from __future__ import annotations

# Exit codes (documented in README.md; keep both in step).
EXIT_OK = 0
EXIT_TESTS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INFRA = 3
EXIT_TIMEOUT = 4
EXIT_TEARDOWN_FAILED = 5
EXIT_INTERRUPTED = 130  # SIGINT; SIGTERM gives 143 and SIGHUP 129 (128 + signal number)


class EphemeraError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with; ``hint`` says what to do."""

    exit_code = EXIT_INFRA
    kind = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class ConfigError(EphemeraError):
    """Bad input: a job file, a flag, a setting, a catalog. Nothing was provisioned."""

    exit_code = EXIT_BAD_INPUT
    kind = "configuration error"


class NoFittingOfferError(ConfigError):
    """No offer in the catalog can hold the job (or all are over the price cap)."""

    kind = "no fitting machine"


class ProviderUnavailableError(ConfigError):
    """A provider plugin is unknown or failed to import (e.g. its SDK is missing)."""

    kind = "provider unavailable"


class InfraError(EphemeraError):
    """Something outside the job went wrong: cloud, network, engine, host."""

    exit_code = EXIT_INFRA
    kind = "infrastructure failure"


class IncompleteSearchError(InfraError):
    """A provider's ``find`` that could not look everywhere it had to (a region, a host
    that did not answer). ``found`` holds what the places that answered returned, so a
    teardown or a reaper can still act on it; ``failures`` says where the search failed.
    Raised instead of returning a partial list, so that nothing relying on the search is
    reported verified."""

    def __init__(self, found: list, failures: list[str], message: str | None = None,
                 *, hint: str | None = None) -> None:
        self.found = list(found)
        self.failures = list(failures)
        super().__init__(message or "could not search everywhere: " + "; ".join(self.failures), hint=hint)


class NoCapacityError(InfraError):
    """The provider has no capacity for the requested machine right now."""

    kind = "no capacity"


class QuotaError(InfraError):
    """An account quota or limit stops the launch."""

    kind = "quota exceeded"


class TransientError(InfraError):
    """A failure that may pass on retry (throttling, 5xx, connection reset)."""

    kind = "transient failure"


class AuthError(InfraError):
    """Credentials are missing or refused."""

    kind = "authentication failure"


class RemoteCommandError(InfraError):
    """A command ephemera ran on the instance failed (not the test suite itself)."""

    kind = "remote command failed"

    def __init__(self, message: str, *, exit_status: int | None = None, output_tail: str = "",
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.exit_status = exit_status
        self.output_tail = output_tail


class ServerFailedError(InfraError):
    """vLLM exited or refused to start on the instance."""

    kind = "server failed"


class PhaseTimeoutError(EphemeraError):
    """A phase (boot, health, suite) or the job's whole deadline ran out."""

    exit_code = EXIT_TIMEOUT
    kind = "timeout"

    def __init__(self, phase: str, seconds: float, message: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message or f"phase '{phase}' did not finish within {seconds:.0f}s", hint=hint)
        self.phase = phase
        self.seconds = seconds


class TeardownError(EphemeraError):
    """Teardown could not be verified: an instance may still be running (and billing)."""

    exit_code = EXIT_TEARDOWN_FAILED
    kind = "teardown not verified"


class Interrupted(EphemeraError):
    """The run was stopped by a signal (SIGINT, SIGTERM, SIGHUP)."""

    kind = "interrupted"

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(f"received {name}")
        self.signum = signum
        self.exit_code = 128 + signum
