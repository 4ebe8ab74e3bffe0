"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def ephemera_command() -> list[str]:
    """The console script next to this interpreter, else ``python -m ephemera``."""
    script = Path(sys.executable).parent / "ephemera"
    if script.exists():
        return [str(script)]
    found = shutil.which("ephemera")
    return [found] if found else [sys.executable, "-m", "ephemera"]
