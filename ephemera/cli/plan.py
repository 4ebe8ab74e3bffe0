"""Pick the cheapest machine that fits a job's model, without launching anything."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("plan")
@click.argument("job_file", type=click.Path(path_type=Path))
@click.option("--tier", help="Apply this tier of the job file.")
@click.option("--catalog", type=click.Path(path_type=Path),
              help="Plan over this CSV catalog instead of the provider's offers.")
@click.option("--provider", "provider_name", help="Plan for this provider (default: the job's).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def command(job_file: Path, tier: str | None, catalog: Path | None, provider_name: str | None,
            as_json: bool) -> None:
    """Pick the cheapest machine that fits a job's model, without launching anything.

    Exits 2 with the table of rejected offers when nothing fits.
    """
    from ephemera.errors import NoFittingOfferError
    from ephemera.masking import job_masker, mask_data
    from ephemera.sizing.plan import plan_job
    from ephemera.spec.jobfile import load_job

    # With a catalog file, the job may name a provider whose plugin is not installed here.
    loaded = load_job(job_file, tier=tier, check_provider=catalog is None)
    job = loaded.job
    masker = job_masker(loaded)
    if job.variants:
        _plan_variants(loaded, catalog, provider_name, as_json)
        return
    try:
        plan = plan_job(job, catalog=catalog, provider_name=provider_name)
    except NoFittingOfferError as exc:
        if as_json:
            rejected = getattr(exc, "rejected", [])
            click.echo(json.dumps({"fits": False, "error": exc.message,
                                   "rejected": [r.to_dict() for r in rejected]}, indent=2))
        raise
    if as_json:
        click.echo(json.dumps({"fits": True, **plan.to_dict(), "tier": tier,
                               "job": mask_data(job.model_dump(mode="json", exclude={"tiers"}), masker)},
                              indent=2))
        return
    if tier:
        m = job.model
        click.echo(f"tier {tier}: {m.id} {m.precision}, max_model_len {m.max_model_len}, "
                   f"suite `{masker(job.suite.command)}`, timeout {job.model_dump(mode='json')['timeout']}")
    _print_plan(plan)


def _print_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    from ephemera.sizing.catalog import offer_capability

    console = Console()
    o, e = plan.offer, plan.estimate
    cap = offer_capability(o)
    gpus = (f"{o.gpu_count} x {o.gpu} ({o.gpu_memory_gib:g} GiB"
            f"{f', compute capability {cap:.1f}' if cap else ''})" if o.gpu
            else f"CPU only ({o.memory_gib:g} GiB RAM)")
    console.print(f"[bold]{o.provider}/{o.instance_type}[/bold] {o.region or ''}  {gpus}  "
                  f"${o.price_per_hour:.4g}/h ({o.price_source or 'price source unknown'})")
    console.print(f"tensor parallelism {plan.tensor_parallel_size}; per GPU: weights "
                  f"{e.weights_gib_per_gpu:.2f} GiB, activation {e.activation_gib_per_gpu:.2f} GiB, "
                  f"KV for one {e.max_model_len}-token request {e.kv_cache_gib_per_request_per_gpu:.2f} "
                  f"GiB of {plan.kv_free_gib_per_gpu:.2f} GiB free "
                  f"({plan.max_full_length_requests} full-length requests)", highlight=False)
    console.print(f"expected cost at most ${plan.expected_cost_usd:.2f} for the job's timeout of "
                  f"{plan.timeout_seconds / 60:g} min", highlight=False)
    console.print(f"disk {plan.disk_gib} GiB for the image and the model "
                  f"({plan.checkpoint_gib:.1f} GiB of model files)", highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)
    if plan.runners_up:
        table = Table(title="runners-up", title_justify="left")
        for col in ("offer", "GPUs", "TP", "$/h", "spare KV GiB"):
            table.add_column(col)
        for c in plan.runners_up[:5]:
            table.add_row(f"{c.offer.provider}/{c.offer.instance_type} {c.offer.region or ''}",
                          f"{c.offer.gpu_count} x {c.offer.gpu}" if c.offer.gpu else "CPU",
                          str(c.tensor_parallel_size), f"{c.offer.price_per_hour:.4g}",
                          f"{c.headroom_gib:.1f}")
        console.print(table)
    if plan.rejected:
        table = Table(title=f"rejected ({len(plan.rejected)})", title_justify="left")
        table.add_column("offer")
        table.add_column("$/h")
        table.add_column("reason")
        for r in plan.rejected[:15]:
            table.add_row(f"{r.offer.provider}/{r.offer.instance_type} {r.offer.region or ''}",
                          f"{r.offer.price_per_hour:.4g}", r.reason)
        if len(plan.rejected) > 15:
            table.add_row("...", "", f"{len(plan.rejected) - 15} more (see --json)")
        console.print(table)


def _plan_variants(loaded, catalog: Path | None, provider_name: str | None, as_json: bool) -> None:
    """Each variant's machine, where they would run (same machine or in parallel) and
    what each placement costs at most."""
    from ephemera.lifecycle.variants import load_variants, placement_lines, plan_placement

    variants = load_variants(loaded, check_provider=catalog is None)
    placement = plan_placement(variants, catalog=catalog, provider_name=provider_name)
    if as_json:
        click.echo(json.dumps({"fits": True, **placement.to_dict()}, indent=2))
        return
    for line in placement_lines(placement):
        click.echo(line)
