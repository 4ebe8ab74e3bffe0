"""Print the JSON Schema of the job file (for editors and linters)."""

from __future__ import annotations

import json

import click


@click.command("schema")
def command() -> None:
    """Print the JSON Schema of the job file (for editors and linters).

    Example for VS Code's YAML extension: ephemera schema > job.schema.json and add
    "# yaml-language-server: $schema=job.schema.json" at the top of job files.
    """
    from ephemera.spec.job import job_json_schema

    click.echo(json.dumps(job_json_schema(), indent=2))
