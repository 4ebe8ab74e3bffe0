"""Check a job file (and its tiers) without provisioning anything."""

from __future__ import annotations

import json

import click


@click.command("validate")
@click.argument("job_file", type=click.Path(path_type=str))
@click.option("--tier", help="Validate this tier and show the merged job.")
@click.option("--json", "as_json", is_flag=True, help="Print the merged job as JSON.")
def command(job_file: str, tier: str | None, as_json: bool) -> None:
    """Check a job file (and its tiers) without provisioning anything.

    Prints every problem at once as FILE:LINE:COLUMN: FIELD: MESSAGE and exits 2,
    or prints the merged job and exits 0.
    """
    from ephemera.masking import job_masker, mask_data
    from ephemera.spec.jobfile import load_job

    loaded = load_job(job_file, tier=tier)
    if loaded.job.variants:
        from ephemera.lifecycle.variants import load_variants

        load_variants(loaded)   # each variant as a whole job, with its lines
    # Values taken from the environment (and secret-looking keys) are shown masked.
    merged = mask_data(loaded.job.model_dump(mode="json", exclude={"tiers"}), job_masker(loaded))
    if as_json:
        click.echo(json.dumps({"valid": True, "file": job_file, "tier": tier, "job": merged,
                               "tiers": sorted(loaded.job.tiers)}, indent=2))
        return
    tiers = ", ".join(sorted(loaded.job.tiers)) or "none"
    label = f" (tier {tier})" if tier else ""
    click.echo(f"{job_file}: valid{label}; tiers: {tiers}")
    if tier:
        import io

        from ruamel.yaml import YAML

        buffer = io.StringIO()
        yaml = YAML()
        yaml.default_flow_style = False
        yaml.dump(merged, buffer)
        click.echo(buffer.getvalue().rstrip())
