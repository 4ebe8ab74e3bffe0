"""Live AWS prices for ``ephemera catalog refresh aws``.

On-demand prices come from the AWS Price List API (the ``pricing`` service, served
from us-east-1), spot prices from each region's DescribeSpotPriceHistory. The GPU
facts (model, count, usable memory) are not in either answer in a usable form, so
they come from the built-in catalog; only prices are refreshed, for the instance
types ephemera knows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from ephemera.provider import Offer

PRICING_REGION = "us-east-1"


def make_provider() -> Any:
    from ephemera_providers.aws import AWSProvider

    return AWSProvider()


def _product_filters(instance_type: str, region: str) -> list[dict[str, str]]:
    wanted = {
        "instanceType": instance_type,
        "regionCode": region,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
    }
    return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in wanted.items()]


def on_demand_price(provider: Any, instance_type: str, region: str) -> float | None:
    """USD per hour for Linux, shared tenancy; None when AWS lists no such product."""
    reply = provider._call("pricing", PRICING_REGION, "get_products", ServiceCode="AmazonEC2",
                           Filters=_product_filters(instance_type, region), MaxResults=100)
    prices = []
    for text in reply.get("PriceList", []):
        product = json.loads(text) if isinstance(text, str) else text
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                usd = dimension.get("pricePerUnit", {}).get("USD")
                if usd and float(usd) > 0:
                    prices.append(float(usd))
    return min(prices) if prices else None


def spot_prices(provider: Any, instance_types: list[str], region: str) -> dict[str, float]:
    """The lowest current spot price per type across the region's zones."""
    out: dict[str, float] = {}
    token = None
    while True:
        params: dict[str, Any] = {"InstanceTypes": instance_types,
                                  "ProductDescriptions": ["Linux/UNIX"],
                                  "StartTime": datetime.now(UTC)}
        if token:
            params["NextToken"] = token
        reply = provider._call("ec2", region, "describe_spot_price_history", **params)
        for item in reply.get("SpotPriceHistory", []):
            price = float(item["SpotPrice"])
            kind = item["InstanceType"]
            out[kind] = min(price, out.get(kind, price))
        token = reply.get("NextToken")
        if not token:
            return out


def spot_price_now(provider: Any, instance_type: str, region: str, zone: str) -> float | None:
    """The latest spot price of a type in one zone (the lowest across the region's zones
    when the zone is unknown); None when AWS gives none or the call is refused."""
    params: dict[str, Any] = {"InstanceTypes": [instance_type],
                              "ProductDescriptions": ["Linux/UNIX"],
                              "StartTime": datetime.now(UTC), "MaxResults": 100}
    if zone:
        params["AvailabilityZone"] = zone
    try:  # one call, no retries: a launch does not wait for a report detail
        reply = provider.client("ec2", region).describe_spot_price_history(**params)
    except Exception:  # noqa: BLE001 - the price is a report detail, never a reason to fail
        return None
    prices = [float(item["SpotPrice"]) for item in reply.get("SpotPriceHistory", [])
              if item.get("InstanceType") == instance_type
              and (not zone or item.get("AvailabilityZone") == zone)]
    return min(prices) if prices else None


def refresh(regions: Iterable[str], provider: Any = None) -> list[Offer]:
    """Offers with today's prices in each region (on-demand and spot)."""
    from ephemera.catalog import builtin_aws_catalog

    provider = provider or make_provider()
    known: dict[str, Offer] = {}
    for offer in builtin_aws_catalog():
        if offer.provider == "aws" and not offer.spot:
            known.setdefault(offer.instance_type, offer)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    offers: list[Offer] = []
    for region in regions:
        spot = spot_prices(provider, sorted(known), region)
        for kind, base in sorted(known.items()):
            price = on_demand_price(provider, kind, region)
            if price is None:
                continue  # not sold in this region
            fields = {**asdict(base), "region": region}
            offers.append(Offer(**{**fields, "price_per_hour": price, "spot": False,
                                   "price_source": f"AWS Price List API {stamp}"}))
            if kind in spot:
                offers.append(Offer(**{**fields, "price_per_hour": spot[kind], "spot": True,
                                       "price_source": f"AWS spot price history {stamp}"}))
    return offers
