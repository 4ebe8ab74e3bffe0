"""Shared by the tests/test_hostile_*.py suites: run a reader on hostile input and
check that it ends in time and within memory, with a value or the expected error.

Time is wall-clock. Memory is how far the process's resident size rose above where
it was when the call began: Linux lets a process reset its peak (VmHWM, through
/proc/self/clear_refs), so the peak read afterwards belongs to the call alone and
counts what C code allocates too. Elsewhere the peak of Python's own allocations
(tracemalloc) is used, which is slower.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 2**20
SECONDS = 2.0          # the longest one reader may take on one input
MEMORY = 200 * MB      # the most one reader may allocate on one input


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1))


def _reset_peak() -> bool:
    """Reset this process's peak resident size; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Memory:
    """The most memory the process took above its size at ``start``."""

    def start(self) -> None:
        self.proc = _reset_peak()
        if self.proc:
            self.base = _status_kib("VmRSS") * 1024
        else:
            self.traced = not tracemalloc.is_tracing()
            if self.traced:
                tracemalloc.start()
            tracemalloc.reset_peak()

    def stop(self) -> int:
        if self.proc:
            return _status_kib("VmHWM") * 1024 - self.base
        peak = tracemalloc.get_traced_memory()[1]
        if self.traced:
            tracemalloc.stop()
        return peak


class Overran(BaseException):
    """Raised into a call that runs far past its time bound (a BaseException, so a
    reader's own ``except Exception`` cannot swallow it)."""


@contextlib.contextmanager
def _alarm(seconds: float):
    """Interrupt a hang: raise Overran after ``seconds`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def overran(signum, frame):
        raise Overran(f"still running after {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, overran)
    started = time.monotonic()
    # pytest-timeout may have a timer running on the same signal: put it back after.
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.001))


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    peak_bytes: int = 0


def bounded(call: Callable[[], Any], errors: tuple[type[BaseException], ...], *,
            seconds: float = SECONDS, memory: int = MEMORY) -> Outcome:
    """Run ``call``; it must return or raise one of ``errors`` (anything else
    propagates and fails the test) within ``seconds`` and ``memory``. A call still
    running at five times ``seconds`` is interrupted and fails the test."""
    meter = _Memory()
    outcome = Outcome()
    meter.start()
    start = time.perf_counter()
    try:
        with _alarm(seconds * 5):
            outcome.value = call()
    except errors as exc:
        outcome.error = exc
    except Overran as exc:
        raise AssertionError(f"did not finish: {exc}") from None
    finally:
        outcome.seconds = time.perf_counter() - start
        outcome.peak_bytes = meter.stop()
    assert outcome.seconds < seconds, f"took {outcome.seconds:.2f}s (limit {seconds}s)"
    assert outcome.peak_bytes < memory, \
        f"took {outcome.peak_bytes / MB:.0f} MB of memory (limit {memory / MB:.0f})"
    return outcome


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    wall_seconds: float
    cpu_seconds: float
    max_rss_bytes: int


# Starts the command from a small process and reports the command's own use. Linux
# counts, in a child's peak memory, the memory of the process it was forked from
# before its exec: forked straight from a big test process, any command would look big.
_TRAMPOLINE = """
import json, os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as fh:
    json.dump({"status": status, "cpu": usage.ru_utime + usage.ru_stime,
               "maxrss": usage.ru_maxrss}, fh)
"""


def run_measured(args: Sequence[str | os.PathLike[str]], *, timeout: float = 60,
                 cwd: Path | None = None) -> Measured:
    """Run a command and read its own resource use (``os.wait4`` on its pid, in a small
    trampoline process, so neither other children of the test process nor the test
    process's own size count)."""
    import json
    import signal
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "usage.json"
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(report), *map(str, args)],
                                stdout=out, stderr=err, cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wall = time.monotonic() - start
        usage = json.loads(report.read_text()) if report.exists() else \
            {"status": proc.returncode, "cpu": float("nan"), "maxrss": 0}
        out.seek(0)
        err.seek(0)
        return Measured(os.waitstatus_to_exitcode(usage["status"]) if report.exists() else proc.returncode,
                        out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        wall, usage["cpu"], usage["maxrss"] * 1024)
