"""Show the price catalog, or refresh it from the provider's live prices."""

from __future__ import annotations

import json
from dataclasses import asdict

import click


@click.group("catalog")
def command() -> None:
    """Show the price catalog, or refresh it from the provider's live prices."""


@command.command("show")
@click.argument("provider", required=False, default="aws")
@click.option("--json", "as_json", is_flag=True, help="Print the offers as JSON.")
def show(provider: str, as_json: bool) -> None:
    """List the offers planning uses for PROVIDER (the refreshed cache, else built-in),
    with each GPU's compute capability (cc)."""
    from ephemera.provider import OfferRequest
    from ephemera.registry import get_provider

    offers = get_provider(provider).offers(OfferRequest(spot=True))
    if as_json:
        click.echo(json.dumps([asdict(o) for o in offers], indent=1))
        return
    from ephemera.sizing.catalog import offer_capability

    click.echo(f"{'instance type':<16} {'region':<12} {'GPUs':<14} {'cc':>4} {'$/h':>9}  source")
    for o in sorted(offers, key=lambda o: (o.price_per_hour, o.instance_type)):
        gpus = f"{o.gpu_count}x {o.gpu}" if o.gpu_count else "cpu"
        cap = offer_capability(o)
        market = " spot" if o.spot else ""
        click.echo(f"{o.instance_type:<16} {o.region or '-':<12} {gpus:<14} "
                   f"{f'{cap:.1f}' if cap else '-':>4} {o.price_per_hour:>9.4f}  "
                   f"{o.price_source}{market}")


@command.command("refresh")
@click.argument("provider", type=click.Choice(["aws"]))
@click.option("--region", "regions", multiple=True,
              help="Region to price (repeatable). Default: EPHEMERA_AWS_REGIONS, else the AWS region.")
@click.option("--json", "as_json", is_flag=True, help="Print the refreshed offers as JSON.")
def refresh(provider: str, regions: tuple[str, ...], as_json: bool) -> None:
    """Read live prices (AWS Price List API and spot price history) into the user's cache."""
    from ephemera_providers import aws_prices

    from ephemera.errors import InfraError
    from ephemera.sizing.catalog import save_cached_offers

    aws = aws_prices.make_provider()
    chosen = list(regions) or aws.find_regions()
    offers = aws_prices.refresh(chosen, provider=aws)
    if not offers:
        raise InfraError(f"AWS listed no prices for the known GPU instance types in {', '.join(chosen)}.",
                         hint="Check the region names; the cache was left as it was.")
    path = save_cached_offers("aws", offers, source="AWS live prices")
    if as_json:
        click.echo(json.dumps({"cache": str(path), "offers": [asdict(o) for o in offers]}, indent=1))
    else:
        spot = sum(o.spot for o in offers)
        click.echo(f"saved {len(offers) - spot} on-demand and {spot} spot prices for "
                   f"{', '.join(chosen)} to {path}")
