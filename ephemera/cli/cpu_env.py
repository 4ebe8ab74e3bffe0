"""Build or check the CPU environment (vLLM's CPU build in a cached venv)."""

from __future__ import annotations

import json
import sys

import click


@click.group("env")
def command() -> None:
    """The built-in CPU environment: vLLM's CPU build in a cached virtualenv, used by
    the local provider on machines without a GPU."""


@command.command("build-cpu")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def build_cpu(as_json: bool) -> None:
    """Build the CPU environment (a no-op when it is already there)."""
    from ephemera.builtins import cpu_env

    def progress(line: str) -> None:
        click.echo(line, err=True)

    python = cpu_env.ensure_cpu_env(progress)
    if as_json:
        json.dump({"python": str(python), "venv": str(cpu_env.venv_dir()),
                   "recipe": cpu_env.recipe(), "hash": cpu_env.recipe_hash()}, sys.stdout)
        click.echo()
    else:
        click.echo(f"CPU environment ready: {python}")


@command.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def status(as_json: bool) -> None:
    """Say whether the CPU environment is built (without building it)."""
    from ephemera.builtins import cpu_env

    ready = cpu_env.is_ready()
    if as_json:
        json.dump({"ready": ready, "venv": str(cpu_env.venv_dir())}, sys.stdout)
        click.echo()
    else:
        click.echo(f"{cpu_env.venv_dir()}: {'ready' if ready else 'not built'}")
