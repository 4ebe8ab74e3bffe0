"""Run a job: plan, provision, serve, test, collect, and always tear down."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command("run")
@click.argument("job_file", type=click.Path(path_type=str))
@click.option("--tier", help="Apply this tier's overrides from the job file.")
@click.option("--provider", "provider_name", help="Use this provider instead of the job's.")
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Plan from this catalog CSV instead of the provider's offers.")
@click.option("--dry-run", is_flag=True, help="Show the plan, the vLLM and suite commands; launch nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the result on stdout.")
@click.option("--variant", hidden=True, help="Run only this variant (one instance of a parallel A/B run).")
@click.option("--run-id", hidden=True, help="The run's id (given by the A/B run that starts it).")
@click.option("--artifacts-dir", hidden=True, type=click.Path(path_type=Path),
              help="Where this run's artifacts go (given by the A/B run that starts it).")
def command(job_file: str, tier: str | None, provider_name: str | None, catalog: Path | None,
            dry_run: bool, as_json: bool, variant: str | None = None, run_id: str | None = None,
            artifacts_dir: Path | None = None) -> None:
    """Run a job: plan, provision, serve, test, collect, and always tear down.

    Exit codes: 0 the suite passed, 1 it failed, 2 bad input, 3 infrastructure
    failure, 4 timeout, 5 teardown not verified, 128+N stopped by signal N.
    """
    from ephemera.errors import EphemeraError

    try:
        _run(job_file, tier, provider_name, catalog, dry_run, as_json, (variant, run_id, artifacts_dir))
    except EphemeraError as exc:
        if as_json:  # CI steps read stdout: give them an object even when nothing ran
            click.echo(json.dumps({"run_id": None, "status": "error", "exit_code": exc.exit_code,
                                   "error": exc.kind, "message": exc.message}, indent=2))
        raise


def _run(job_file: str, tier: str | None, provider_name: str | None, catalog: Path | None,
         dry_run: bool, as_json: bool,
         one: tuple[str | None, str | None, Path | None] = (None, None, None)) -> None:
    from ephemera.lifecycle.controller import Run
    from ephemera.progress import Reporter
    from ephemera.spec.jobfile import load_job
    from ephemera.spec.settings import get_settings

    settings = get_settings()
    loaded = load_job(job_file, tier=tier, check_provider=provider_name is None)
    if provider_name:
        from ephemera.registry import load_provider_class

        load_provider_class(provider_name)  # unknown/broken plugin: exit 2 before anything
    variant, run_id, artifacts_dir = one
    if loaded.job.variants and variant is None:
        from ephemera.lifecycle.ab_run import run_variants

        sys.exit(run_variants(job_file, loaded, tier=tier, provider_name=provider_name,
                              catalog=catalog, dry_run=dry_run, as_json=as_json))
    if variant is not None:
        from ephemera.lifecycle.variants import one_variant

        loaded = one_variant(loaded, variant, check_provider=provider_name is None)
    reporter = Reporter()
    run = Run(loaded, settings=settings, reporter=reporter, provider_name=provider_name, catalog=catalog,
              run_id=run_id)
    if artifacts_dir is not None:
        run.artifacts_dir = artifacts_dir.resolve()
    if dry_run:
        result = run.dry_run()
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=2))
        else:
            plan = result.plan
            offer = plan.offer
            click.echo(f"plan:   {offer.provider} {offer.instance_type} ({offer.gpu_count} x {offer.gpu or 'CPU'}) "
                       f"region {offer.region or '-'}, tensor parallel {plan.tensor_parallel_size}, "
                       f"${offer.price_per_hour:.4f}/h")
            click.echo(f"server: {result.server_command}")
            click.echo(f"suite:  {result.suite_command}")
            click.echo("nothing was launched (--dry-run)")
        return
    result = run.execute()
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        cost = result.cost or {}
        usd = cost.get("usd", cost.get("cost_usd"))
        line = f"{result.status.upper()}: {result.message}"
        if usd is not None:
            line += f" | cost ${usd:.4f}"
        if result.artifacts_dir:
            line += f" | artifacts {result.artifacts_dir}"
        click.echo(line, err=True)
    sys.exit(result.exit_code)
