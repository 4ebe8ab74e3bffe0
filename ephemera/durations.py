"""Durations as people write them: ``90s``, ``20m``, ``1h30m``, ``2h``, or plain seconds."""

from __future__ import annotations

import math
import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: object) -> float:
    """Seconds in ``value``. Raises ValueError with a readable reason."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 20m or 1h30m, found a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, found {value}")
        if value <= 0:
            raise ValueError(f"a duration must be positive, found {value}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 90s, 20m or 1h30m, found {type(value).__name__}")
    text = value.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        pos, seconds, seen = 0, 0.0, []
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            unit = match.group(2)
            if unit in seen or (seen and "hms".index(unit) < "hms".index(seen[-1])):
                raise ValueError(f"'{value}' is not a duration (units must be h, m, s in that order, once each)")
            seen.append(unit)
            seconds += float(match.group(1)) * _UNIT[unit]
            pos = match.end()
        if pos != len(text) or not seen:
            raise ValueError(f"'{value}' is not a duration: write e.g. 90s, 20m or 1h30m")
    if not math.isfinite(seconds):
        raise ValueError(f"'{value}' is too large for a duration")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, found '{value}'")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s or not (h or m) else ""]
    return "".join(parts)
