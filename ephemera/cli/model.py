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
@click.option("--vision", is_flag=True,
              help="The vision-language sibling (ephemera/tiny-vl, CACHE_DIR/models/tiny-vl).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def tiny(out: Path | None, vision: bool, as_json: bool) -> None:
    """Write the tiny random Llama, or with --vision its vision-language sibling (a no-op
    when it is already there)."""
    from ephemera.builtins.tiny_model import ensure_tiny_model

    def progress(line: str) -> None:
        click.echo(line, err=True)

    name = "tiny-vl" if vision else "tiny-llama"
    path = ensure_tiny_model(progress, out=out, name=name)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    if as_json:
        json.dump({"path": str(path), "model": f"ephemera/{name}", "bytes": size}, sys.stdout)
        click.echo()
    else:
        click.echo(str(path))
