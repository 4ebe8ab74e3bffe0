"""Shell scripts for providers that run jobs in a working directory on an existing
machine (``local`` and ``ssh``): a dead-man switch and the clean-up it shares with
``terminate``.

They are plain POSIX shell so the same text works on this machine and on any host we
reach over SSH, and so the watchdog needs nothing from ephemera once started: killing
the ephemera process (even with SIGKILL) leaves it running until the run's expiry.

Layout of a run's working directory:
    labels.json   one JSON line: {"id", "run_id", "labels" (prefixed keys), ...}
    .pgids        process group ids the run started, one per line
    .watchdog     pid (= process group id) of the watchdog
"""

from __future__ import annotations

import re
import shlex

from ephemera.errors import ConfigError

LABEL_PREFIX = "ephemera."
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> str:
    """Run ids name directories that get ``rm -rf``'d: refuse anything path-like."""
    if not RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ConfigError(f"run id '{run_id}' is not usable as a directory name "
                          "(letters, digits, '.', '_' and '-' only)")
    return run_id


def prefixed(labels: dict[str, str]) -> dict[str, str]:
    return {f"{LABEL_PREFIX}{k}": str(v) for k, v in labels.items()}


def unprefixed(labels: dict[str, str]) -> dict[str, str]:
    return {k[len(LABEL_PREFIX):]: v for k, v in labels.items() if k.startswith(LABEL_PREFIX)}


def _kill_and_remove(d: str) -> str:
    """Kill the run's process groups (TERM, up to 3 s, then KILL), remove the directory."""
    return (
        f'pgs=$(cat "{d}/.pgids" 2>/dev/null); '
        'for pg in $pgs; do kill -s TERM -- "-$pg" 2>/dev/null; done; '
        'i=0; while [ $i -lt 30 ]; do alive=0; '
        'for pg in $pgs; do kill -s 0 -- "-$pg" 2>/dev/null && alive=1; done; '
        '[ $alive = 0 ] && break; sleep 0.1; i=$((i+1)); done; '
        'for pg in $pgs; do kill -s KILL -- "-$pg" 2>/dev/null; done; '
        f'rm -rf -- "{d}"; '
    )


def watchdog_script(workdir: str, expires_epoch: int) -> str:
    """Wait until ``expires_epoch`` (Unix seconds); then, if the directory still
    exists, end everything the run started and remove it. Exits early when the
    directory disappears (a normal terminate)."""
    if "\n" in workdir or not workdir.startswith("/") or workdir.rstrip("/") == "":
        raise ConfigError(f"working directory '{workdir}' must be an absolute path below /")
    return (
        f"# ephemera-watchdog {workdir}\n"
        f"d={shlex.quote(workdir)}; until={int(expires_epoch)}; "
        'while [ -d "$d" ] && [ "$(date +%s)" -lt "$until" ]; do sleep 1; done; '
        '[ -d "$d" ] || exit 0; '
        + _kill_and_remove("$d")
    )


def cleanup_script(workdir: str) -> str:
    """Stop the watchdog, kill the run's process groups, remove the directory. Exit 0
    when the directory is gone (including when it never existed)."""
    return (
        f"d={shlex.quote(workdir)}; "
        '[ -d "$d" ] || exit 0; '
        'w=$(cat "$d/.watchdog" 2>/dev/null); '
        'if [ -n "$w" ] && tr "\\0" " " < "/proc/$w/cmdline" 2>/dev/null '
        '| grep -qF -- "ephemera-watchdog $d"; then '
        'kill -s KILL -- "-$w" 2>/dev/null || kill -s KILL "$w" 2>/dev/null; fi; '
        + _kill_and_remove("$d")
        + '[ ! -e "$d" ]'
    )


def start_watchdog_command(workdir: str, expires_epoch: int) -> str:
    """A shell line that starts the watchdog detached (own session, no open streams),
    records its pid in ``.watchdog`` and prints it."""
    script = watchdog_script(workdir, expires_epoch)
    q = shlex.quote(workdir)
    return (f"setsid sh -c {shlex.quote(script)} > /dev/null 2>&1 < /dev/null & "
            f"echo $! > {q}/.watchdog; echo $!")
