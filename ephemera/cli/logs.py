"""Show a run's logs (suite output, vLLM's log), live or from its artifacts."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

POLL_SECONDS = 0.5
MAX_LINES_PER_READ = 5000


@dataclass
class Source:
    """One log: lines already shown, where it is while the run is live and after."""

    name: str
    local: Path                                   # on this machine (artifacts)
    remote: str | None = None                     # on the instance, read through the channel
    shown: int = 0
    pending: list[str] = field(default_factory=list)

    def read_local(self) -> list[str]:
        """Complete lines of the local file after the ones shown."""
        try:
            text = self.local.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        lines = text.split("\n")[:-1]   # a last line without its newline is not complete yet
        return lines[self.shown:]


def remote_lines_command(path: str, start: int) -> str:
    """Shell line printing the complete lines of ``path`` from line ``start`` (1-based)."""
    q = shlex.quote(path)
    end = f"$(( n < {start + MAX_LINES_PER_READ - 1} ? n : {start + MAX_LINES_PER_READ - 1} ))"
    return (f"n=$(wc -l < {q} 2>/dev/null || echo 0); "
            f"if [ \"$n\" -ge {start} ]; then sed -n \"{start},{end}p\" {q}; fi; true")


class LiveRun:
    """The channel to a live run's instance (through its provider), opened once."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.remote: Any = None

    def read(self, source: Source) -> list[str]:
        if self.remote is None:
            from ephemera.registry import get_provider

            self.remote = get_provider(self.state.provider).connect(self.state.instance)
        got: list[str] = []
        result = self.remote.run(remote_lines_command(source.remote, source.shown + 1),
                                 timeout=30, on_line=got.append)
        return got if result.ok else []

    def close(self) -> None:
        if self.remote is not None:
            try:
                self.remote.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


def _is_live(settings: Any, run_id: str) -> Any:
    """The run's state while its process is still going, else None."""
    from ephemera.lifecycle.state import ACTIVE, load_state, owner_alive

    state = load_state(settings.state_dir, run_id)
    if state is None or state.status not in ACTIVE or not owner_alive(state):
        return None
    return state


def _sources(state: Any, artifacts: Path, which: str) -> list[Source]:
    workdir = state.instance.workdir if state is not None and state.instance else None
    found = []
    if which in ("both", "server"):
        found.append(Source("server", artifacts / "vllm.log",
                            f"{workdir}/logs/vllm.log" if workdir else None))
    if which in ("both", "suite"):
        found.append(Source("suite", artifacts / "suite.log"))
    return found


def _drain(sources: list[Source], live: LiveRun | None, emit: Callable[[Source, str], None]) -> None:
    for source in sources:
        if live is not None and source.remote:
            try:
                lines = live.read(source)
            except Exception:  # noqa: BLE001 - the run is ending: its artifacts have the rest
                source.remote = None
                continue
        else:
            lines = source.read_local()
        for line in lines:
            emit(source, line)
        source.shown += len(lines)


def log_masker(state: Any) -> Callable[[str], str]:
    """What the run would mask: the secret-looking values of this environment and, when
    the run's job file can be read again, what it substitutes and its secret keys. A
    live server log comes straight from the instance, so it is masked here."""
    import os

    from ephemera.masking import Masker, job_masker, secret_values

    here = Masker(secret_values(os.environ))
    job_file = (state.extra.get("job_file") if state is not None else None) or ""
    if not job_file:
        return here
    try:
        from ephemera.spec.jobfile import load_job

        of_job = job_masker(load_job(job_file, tier=state.extra.get("tier") or None))
    except Exception as exc:  # noqa: BLE001 - the logs are still worth showing
        click.echo(f"warning: could not read the run's job file {job_file} ({exc}); only "
                   "secret-looking values of this environment are masked", err=True)
        return here
    return lambda line: of_job(here(line))


@click.command("logs")
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the run ends.")
@click.option("--server", "which", flag_value="server", help="Only vLLM's log.")
@click.option("--suite", "which", flag_value="suite", help="Only the suite's output.")
def command(run_id: str, follow: bool, which: str | None) -> None:
    """Show a run's logs (suite output, vLLM's log), live or from its artifacts.

    While `ephemera run` is going on this machine, the suite's output is read from the
    file that run writes and vLLM's log through the provider's channel to the
    instance; afterwards both come from the run's artifacts. With --follow, new lines
    are printed as they come until the run ends.
    """
    from ephemera.errors import ConfigError
    from ephemera.lifecycle.state import load_state
    from ephemera.spec.settings import get_settings

    which = which or "both"
    settings = get_settings()
    state = load_state(settings.state_dir, run_id)
    artifacts = Path(state.artifacts_dir) if state and state.artifacts_dir else (
        settings.artifacts_dir / run_id).resolve()
    if state is None and not artifacts.is_dir():
        raise ConfigError(f"run '{run_id}' is not known here: no state file in "
                          f"{settings.state_dir / 'runs'} and no artifacts in {artifacts}")
    sources = _sources(state, artifacts, which)

    mask = log_masker(state)

    def emit(source: Source, line: str) -> None:
        line = mask(line)
        click.echo(f"{source.name}| {line}" if len(sources) > 1 else line)

    live_state = _is_live(settings, run_id)
    live = LiveRun(live_state) if live_state is not None else None
    try:
        _drain(sources, live, emit)
        while follow and live is not None:
            time.sleep(POLL_SECONDS)
            if _is_live(settings, run_id) is None:
                break
            _drain(sources, live, emit)
    finally:
        if live is not None:
            live.close()
    if live is not None:
        # The run ended (or was live when read once): the rest from what it collected.
        _drain(sources, None, emit)
