"""A lock across processes, for builds that must not run twice at once (two CI steps,
parallel test sessions sharing one cache)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory/.lock`` exclusively for the duration of the block."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
