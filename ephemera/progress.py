"""What a run shows while it works: a live spinner with the current phase and elapsed
time on a terminal, plain timestamped lines in CI (with GitHub Actions' log groups
and error annotations when running there). Everything goes to stderr, so that
``--json`` keeps stdout for the final object."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import TextIO


class Reporter:
    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None,
                 quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.github = os.environ.get("GITHUB_ACTIONS") == "true"
        is_tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.live = is_tty and not self.github if live is None else live
        self.quiet = quiet
        # The run's masker (ephemera.masking) once the job is known: every secret in any
        # text shown is replaced before it is written.
        self.masker: Callable[[str], str] = str
        # Re-entrant: a signal handler may log while the main thread is in the middle of a line.
        self._lock = threading.RLock()
        self._status = None
        self._console = None
        self._phase: str | None = None
        self._phase_started = 0.0
        self._progress = ""             # the latest progress note of the phase
        self._progress_shown = ""       # the plain progress line written last, and when
        self._progress_shown_at = 0.0
        if self.live:
            from rich.console import Console

            self._console = Console(file=self.stream, highlight=False)

    # -- plain output -------------------------------------------------------------------
    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.started:7.1f}s]"

    @staticmethod
    def _neutral(line: str) -> str:
        """A line of text others wrote (suite or server output, log tails in messages)
        cannot be a GitHub workflow command (``::error::``, ``::add-mask::``,
        ``::stop-commands::``): one that would be is shown behind a marker."""
        return f"| {line}" if line.lstrip().startswith("::") else line

    def _emit(self, text: str, *, command: bool = False) -> None:
        """Write ``text``; only its first line may be a workflow command, and only when
        ephemera itself made it (``command``)."""
        if self.quiet:
            return
        first, *rest = self.masker(text).split("\n")
        text = "\n".join([first if command else self._neutral(first), *map(self._neutral, rest)])
        with self._lock:
            if self._console is not None:
                self._console.print(text, markup=False, highlight=False, soft_wrap=True)
            else:
                self.stream.write(text + "\n")
                self.stream.flush()

    def info(self, message: str) -> None:
        self._emit(f"{self._stamp()} {message}")

    def warn(self, message: str) -> None:
        if self.github:
            self._emit(f"::warning::{message}", command=True)
        else:
            self._emit(f"{self._stamp()} warning: {message}")

    def error(self, message: str) -> None:
        if self.github:
            # Annotations are one line; the full text follows in the log.
            self._emit(f"::error::{message.splitlines()[0] if message else ''}", command=True)
        self._emit(f"{self._stamp()} error: {message}")

    def line(self, text: str, source: str = "") -> None:
        """A line of remote output (suite, server), passed through as it comes."""
        prefix = f"{source}| " if source and not self.github else ""
        self._emit(f"{prefix}{text}")

    def progress(self, text: str, every: float = 5.0) -> None:
        """How a long phase is getting on (layers pulled, bytes downloaded, the server's
        last log line). On a terminal it follows the phase's spinner; in plain output it
        is a timestamped line, at most one per ``every`` seconds and only when it changed."""
        text = self.masker(text.replace("\n", " ").strip())
        now = time.monotonic()
        with self._lock:
            self._progress = text
            if (self._status is not None or text == self._progress_shown
                    or now - self._progress_shown_at < every):
                return
            self._progress_shown, self._progress_shown_at = text, now
        self.info(f"  {text}")

    # -- phases -------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str, detail: str = ""):
        self._phase, self._phase_started = name, time.monotonic()
        self._progress, self._progress_shown, self._progress_shown_at = "", "", 0.0
        label = f"{name}{': ' + detail if detail else ''}"
        self.info(f"> {label}")
        status = None
        if self._console is not None and not self.quiet:
            status = self._console.status(f"{label} ...", spinner="dots")
            status.start()
            self._status = status
            ticker = threading.Thread(target=self._tick, args=(status, label), daemon=True)
            ticker.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            if status is not None:
                self._status = None
                status.stop()
            elapsed = time.monotonic() - self._phase_started
            self.info(f"{'ok' if ok else 'stopped'} {name} ({elapsed:.1f}s)")
            self._phase = None

    def _tick(self, status, label: str) -> None:
        while self._status is status:
            note = f"  {self._progress}" if self._progress else ""
            status.update(f"{label} ... {time.monotonic() - self._phase_started:.0f}s{note}")
            time.sleep(0.5)

    @contextmanager
    def group(self, title: str):
        """A collapsible log group on GitHub Actions; a heading elsewhere."""
        if self.github:
            self._emit(f"::group::{title.splitlines()[0] if title else ''}", command=True)
        else:
            self.info(title)
        try:
            yield
        finally:
            if self.github:
                self._emit("::endgroup::", command=True)
