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


# Shell functions that decide whether a recorded process group still belongs to the run
# (pids are recycled, and a .pgids file may outlive a reboot or be damaged). A group is
# the run's when one of its processes - the leader, or any member once the leader is
# gone - has EPHEMERA_RUN_ID=<run id> in its environment, names the run's directory on
# its command line, or works inside that directory. Anything that is not a plain
# number above 1 is never the run's (kill -1 would signal every process we may
# signal, 0 our own group). Expects $d (the directory) and $run (the run id).
_OWNERSHIP = (
    '_mine() { '
    'tr "\\0" "\\n" 2>/dev/null < "/proc/$1/environ" | grep -qxF -- "EPHEMERA_RUN_ID=$run" '
    '&& return 0; '
    'tr "\\0" "\\n" 2>/dev/null < "/proc/$1/cmdline" | grep -qF -- "$d/" && return 0; '
    '_c=$(readlink "/proc/$1/cwd" 2>/dev/null) || return 1; '
    'case "$_c/" in "$d"/*) return 0;; esac; return 1; }; '
    '_owned() { '
    'case "$1" in ""|*[!0-9]*) return 1;; esac; '
    '[ "${#1}" -le 10 ] && [ "$1" -gt 1 ] 2>/dev/null || return 1; '
    'kill -s 0 -- "-$1" 2>/dev/null || return 1; '
    '_mine "$1" && return 0; '
    # A live leader that is not the run's: the group is someone else's.
    '[ -n "$(tr -d "\\0" 2>/dev/null < "/proc/$1/cmdline")" ] && return 1; '
    '_g=$1; for _p in /proc/[0-9]*; do '
    'read -r _s 2>/dev/null < "$_p/stat" || continue; _s=${_s##*") "}; set -- $_s; '
    '[ "$3" = "$_g" ] && _mine "${_p#/proc/}" && return 0; done; return 1; }; '
)


def _kill_and_remove(d: str) -> str:
    """Kill the run's process groups (TERM, up to 3 s, then KILL), remove the directory.
    Only groups that still belong to the run are signalled (see ``_OWNERSHIP``)."""
    return (
        _OWNERSHIP
        + f'pgs=""; if [ -r "{d}/.pgids" ]; then '
        'while read -r pg || [ -n "$pg" ]; do _owned "$pg" && pgs="$pgs $pg"; '
        f'done < "{d}/.pgids"; fi; '
        'for pg in $pgs; do kill -s TERM -- "-$pg" 2>/dev/null; done; '
        'i=0; while [ $i -lt 30 ]; do alive=0; '
        'for pg in $pgs; do kill -s 0 -- "-$pg" 2>/dev/null && alive=1; done; '
        '[ $alive = 0 ] && break; sleep 0.1; i=$((i+1)); done; '
        'for pg in $pgs; do _owned "$pg" && kill -s KILL -- "-$pg" 2>/dev/null; done; '
        f'rm -rf -- "{d}"; '
    )


def _run_of(workdir: str, run_id: str | None) -> str:
    """The run id a working directory belongs to: its last path element, which must be
    ``run_id`` when that is given."""
    name = workdir.rstrip("/").rsplit("/", 1)[-1]
    if run_id is not None and name != run_id:
        raise ConfigError(f"working directory '{workdir}' does not belong to run '{run_id}'")
    return check_run_id(name)


def watchdog_script(workdir: str, expires_epoch: int, run_id: str | None = None) -> str:
    """Wait until ``expires_epoch`` (Unix seconds); then, if the directory still
    exists, end everything the run started and remove it. Exits early when the
    directory disappears (a normal terminate)."""
    if "\n" in workdir or not workdir.startswith("/") or workdir.rstrip("/") == "":
        raise ConfigError(f"working directory '{workdir}' must be an absolute path below /")
    return (
        f"# ephemera-watchdog {workdir}\n"
        f"d={shlex.quote(workdir.rstrip('/'))}; run={shlex.quote(_run_of(workdir, run_id))}; "
        f"until={int(expires_epoch)}; "
        'while [ -d "$d" ] && [ "$(date +%s)" -lt "$until" ]; do sleep 1; done; '
        '[ -d "$d" ] || exit 0; '
        + _kill_and_remove("$d")
    )


def cleanup_script(workdir: str, run_id: str | None = None) -> str:
    """Stop the watchdog, kill the run's process groups, remove the directory. Exit 0
    when the directory is gone (including when it never existed). A directory without
    the marks a launch leaves (``.pgids``, ``labels.json``) is not a run's: it is only
    removed when empty, else the script fails and touches nothing."""
    return (
        f"d={shlex.quote(workdir.rstrip('/'))}; run={shlex.quote(_run_of(workdir, run_id))}; "
        '[ -d "$d" ] || exit 0; '
        'if [ ! -f "$d/.pgids" ] && [ ! -f "$d/labels.json" ]; then '
        'rmdir -- "$d" 2>/dev/null && exit 0; '
        'echo "$d is not a run directory (no .pgids or labels.json): not touching it" >&2; '
        'exit 3; fi; '
        'w=$(cat "$d/.watchdog" 2>/dev/null); '
        'case "$w" in ""|*[!0-9]*|0|1) w="";; esac; '
        'if [ -n "$w" ] && tr "\\0" " " < "/proc/$w/cmdline" 2>/dev/null '
        '| grep -qF -- "ephemera-watchdog $d"; then '
        'kill -s KILL -- "-$w" 2>/dev/null || kill -s KILL "$w" 2>/dev/null; fi; '
        + _kill_and_remove("$d")
        + '[ ! -e "$d" ]'
    )


def start_watchdog_command(workdir: str, expires_epoch: int, run_id: str | None = None) -> str:
    """A shell line that starts the watchdog detached (own session, no open streams),
    records its pid in ``.watchdog`` and prints it."""
    script = watchdog_script(workdir, expires_epoch, run_id)
    q = shlex.quote(workdir)
    return (f"setsid sh -c {shlex.quote(script)} > /dev/null 2>&1 < /dev/null & "
            f"echo $! > {q}/.watchdog; echo $!")
