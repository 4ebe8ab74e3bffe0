"""Make the built-in tiny random model (ephemera/tiny-llama)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group("model")
def command() -> None:
    """Models ephemera makes on this machine."""


@command.command("tiny")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory to write to (default: CACHE_DIR/models/tiny-llama).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def tiny(out: Path | None, as_json: bool) -> None:
    """Write the tiny random Llama (a no-op when it is already there)."""
    from ephemera.tiny_model import ensure_tiny_model

    def progress(line: str) -> None:
        click.echo(line, err=True)

    path = ensure_tiny_model(progress, out=out)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    if as_json:
        json.dump({"path": str(path), "model": "ephemera/tiny-llama", "bytes": size}, sys.stdout)
        click.echo()
    else:
        click.echo(str(path))
