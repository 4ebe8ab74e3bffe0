"""Durations as people write them: ``90s``, ``20m``, ``1h30m``, ``2h``, or plain seconds."""

from __future__ import annotations

import math
import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0}
_MAX_TEXT = 64

# The longest any duration in a job file may be: a run (and so each of its phases)
# lasts at most a week. Cloud machines bill by the hour, CI runners end jobs within
# days, and a dead-man switch further out than this protects nothing.
MAX_JOB_SECONDS = 7 * 24 * 3600
MIN_JOB_SECONDS = 0.001


def parse_duration(value: object, *, minimum: float | None = None,
                   maximum: float | None = None) -> float:
    """Seconds in ``value``. Raises ValueError with a readable reason, also when the
    duration is outside ``minimum`` to ``maximum`` seconds (when given)."""
    if maximum is not None and type(value) is int and value > maximum:
        seconds = math.inf  # an integer too large for a float
    else:
        seconds = _seconds(value)
    if minimum is not None and seconds < minimum:
        raise ValueError(f"a duration is at least {format_job_duration(minimum)}, found {_quoted(value)}")
    if maximum is not None and seconds > maximum:
        raise ValueError(f"a duration is at most {format_duration(maximum)} "
                         f"({maximum / 86400:g} days), found {_quoted(value)}")
    return seconds


def parse_job_duration(value: object) -> float:
    """A duration in a job file: from a millisecond to :data:`MAX_JOB_SECONDS`, in whole
    milliseconds (so that it is written back as it was read)."""
    return round(parse_duration(value, minimum=MIN_JOB_SECONDS, maximum=MAX_JOB_SECONDS), 3)


def _quoted(value: object) -> str:
    if isinstance(value, int) and abs(value) > 10**_MAX_TEXT:
        return f"a number of {len(str(abs(value)))} digits" if abs(value) < 10**4000 else "a huge number"
    text = str(value)
    text = text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."
    return f"'{text}'" if isinstance(value, str) else text


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 20m or 1h30m, found a boolean")
    if isinstance(value, int) and abs(value) > 10**15:
        raise ValueError(f"{_quoted(value)} is too large for a duration")
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
                raise ValueError(f"{_quoted(value)} is not a duration (units must be h, m, s in that order, once each)")
            seen.append(unit)
            seconds += float(match.group(1)) * _UNIT[unit]
            pos = match.end()
        if pos != len(text) or not seen:
            raise ValueError(f"{_quoted(value)} is not a duration: write e.g. 90s, 20m or 1h30m")
    if not math.isfinite(seconds):
        raise ValueError(f"{_quoted(value)} is too large for a duration")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, found {_quoted(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s or not (h or m) else ""]
    return "".join(parts)


def format_job_duration(seconds: float) -> str:
    """Like :func:`format_duration`, keeping milliseconds, so that what a job's
    duration is written as reads back as the same duration."""
    whole, millis = divmod(round(seconds * 1000), 1000)
    text = format_duration(whole)
    if not millis:
        return text
    fraction = f"{millis / 1000:.3f}".rstrip("0")[1:]   # ".5"
    if text.endswith("s"):
        return text[:-1] + fraction + "s"
    return text + "0" + fraction + "s"
