"""Build or inspect the built-in CPU image (ephemera/cpu)."""

from __future__ import annotations

import json
import sys

import click


@click.group("image")
def command() -> None:
    """The built-in CPU image: vLLM's CPU build in a container, built here from a
    Debian root filesystem (no registry needed)."""


@command.command("build-cpu")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def build_cpu(as_json: bool) -> None:
    """Build ephemera/cpu:<recipe hash> (a no-op when it already exists)."""
    import time

    from ephemera.builtins.cpu_image import ensure_cpu_image, status

    def progress(line: str) -> None:
        click.echo(line, err=True)

    started = time.monotonic()
    ref = ensure_cpu_image(progress)
    if as_json:
        info = status().to_dict()
        info["seconds"] = round(time.monotonic() - started, 1)
        json.dump(info, sys.stdout)
        click.echo()
    else:
        click.echo(ref)


@command.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def status_cmd(as_json: bool) -> None:
    """Say whether the CPU image, its base and its wheelhouse are built."""
    from ephemera.builtins.cpu_image import status

    info = status()
    if as_json:
        json.dump(info.to_dict(), sys.stdout)
        click.echo()
        return
    size = f" ({info.size_bytes / 2**30:.1f} GiB)" if info.size_bytes else ""
    click.echo(f"image      {info.image}: {'present' if info.present else 'missing'}{size}")
    click.echo(f"base       {info.base}: {'present' if info.base_present else 'missing'}")
    click.echo(f"wheelhouse {info.wheelhouse}: "
               f"{'complete' if info.wheelhouse_ready else 'missing'}")
