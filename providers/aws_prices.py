"""Live AWS prices for ``ephemera catalog refresh aws``.

On-demand prices come from the AWS Price List API (the ``pricing`` service, served
from us-east-1), spot prices from each region's DescribeSpotPriceHistory. The GPU
facts (model, count, usable memory) are not in either answer in a usable form, so
they come from the built-in catalog; only prices are refreshed, for the instance
types ephemera knows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from ephemera_providers.aws_common import entries, mapping, shown

from ephemera.errors import InfraError
from ephemera.provider import Offer

PRICING_REGION = "us-east-1"
# A Price List product is a few kB of JSON; the most of one that is read.
MAX_PRODUCT_CHARS = 1_000_000
MAX_PAGES = 1000


def make_provider() -> Any:
    """The registered aws provider (through the registry: this module is one of its parts)."""
    from ephemera.registry import get_provider

    return get_provider("aws")


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
    where = f"Price List GetProducts for {instance_type} in {region}"
    prices = []
    for index, item in enumerate(entries(reply, "PriceList", where, of=(str, dict))):
        product = _product(item, f"{where}: PriceList[{index}]")
        for term in _values(mapping(product.get("terms")).get("OnDemand")):
            for dimension in _values(mapping(term).get("priceDimensions")):
                usd = mapping(mapping(dimension).get("pricePerUnit")).get("USD")
                price = _price(usd, f"{where}: pricePerUnit.USD")
                if price:
                    prices.append(price)
    return min(prices) if prices else None


def _product(item: Any, where: str) -> Mapping[str, Any]:
    """One Price List product: a JSON object, as text or already decoded."""
    if isinstance(item, str):
        if len(item) > MAX_PRODUCT_CHARS:
            raise InfraError(f"{where} is {len(item)} characters long (at most "
                             f"{MAX_PRODUCT_CHARS} are read).")
        try:
            item = json.loads(item)
        except (ValueError, RecursionError) as exc:
            raise InfraError(f"{where} is not JSON ({shown(str(exc))}).") from None
    if not isinstance(item, Mapping):
        raise InfraError(f"{where} is not a JSON object.")
    return item


def _values(value: Any) -> list[Any]:
    return list(value.values()) if isinstance(value, Mapping) else []


def _price(value: Any, where: str) -> float | None:
    """A price in USD per hour: a finite number at least 0 (a number or its text);
    None when the answer gives none."""
    if value is None or value == "":
        return None
    price = math.nan
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        try:
            price = float(value)
        except (ValueError, OverflowError):
            pass
    if not math.isfinite(price) or price < 0:
        raise InfraError(f"{where} = {shown(value)[:80]} is not a price.")
    return price


def spot_prices(provider: Any, instance_types: list[str], region: str) -> dict[str, float]:
    """The lowest current spot price per type across the region's zones."""
    out: dict[str, float] = {}
    token = None
    seen: set[str] = set()
    while True:
        params: dict[str, Any] = {"InstanceTypes": instance_types,
                                  "ProductDescriptions": ["Linux/UNIX"],
                                  "StartTime": datetime.now(UTC)}
        if token:
            params["NextToken"] = token
        reply = provider._call("ec2", region, "describe_spot_price_history", **params)
        where = f"DescribeSpotPriceHistory in {region}"
        for item in entries(reply, "SpotPriceHistory", where):
            price = _price(item.get("SpotPrice"), f"{where}: SpotPrice")
            kind = item.get("InstanceType")
            if price is None or kind not in instance_types:
                continue  # no price, or a type that was not asked for
            out[kind] = min(price, out.get(kind, price))
        token = reply.get("NextToken")
        if not token:
            return out
        if not isinstance(token, str) or token in seen or len(seen) >= MAX_PAGES:
            raise InfraError(f"AWS {where} gave NextToken {shown(token)[:80]} again or "
                             f"more than {MAX_PAGES} pages; stopped reading.")
        seen.add(token)


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
    prices = []
    items = reply.get("SpotPriceHistory") if isinstance(reply, Mapping) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping) or item.get("InstanceType") != instance_type:
            continue
        if zone and item.get("AvailabilityZone") != zone:
            continue
        try:
            price = _price(item.get("SpotPrice"), "SpotPrice")
        except InfraError:
            continue  # a malformed entry is no price; the catalog's is used instead
        if price:
            prices.append(price)
    return min(prices) if prices else None


def refresh(regions: Iterable[str], provider: Any = None) -> list[Offer]:
    """Offers with today's prices in each region (on-demand and spot)."""
    from ephemera.sizing.catalog import builtin_aws_catalog

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
