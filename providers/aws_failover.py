"""Failover inside one launch: which markets to try in a region (spot availability,
vCPU quotas, the price cap), what a failed RunInstances means, and what the launched
instance is billed at.

A mixin of :class:`ephemera_providers.aws.AWSProvider`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ephemera_providers.aws_common import Options, is_boto_error, mapping, text
from ephemera_providers.aws_errors import (
    QUOTA_CODES,
    SPOT_ROLE_HINT,
    Kind,
    classify,
    error_code,
    error_text,
    to_ephemera_error,
)
from ephemera_providers.aws_resources import SkipRegion

from ephemera.errors import EphemeraError, NoCapacityError, QuotaError
from ephemera.provider import LaunchSpec, Offer, OfferRequest


@dataclass
class Attempt:
    """What one launch learned on its way: why each place was passed over, hints for
    the user, and notes the launched instance carries (a fallback that happened)."""

    failures: list[str] = field(default_factory=list)
    quota_hints: list[str] = field(default_factory=list)
    quota_failures: int = 0
    hints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def quota(self, reason: str, hint: str) -> None:
        self.failures.append(reason)
        self.quota_hints.append(hint)
        self.quota_failures += 1

    def error(self, instance_type: str, regions: list[str]) -> EphemeraError:
        where = ", ".join(regions)
        detail = "; ".join(self.failures) or "nothing was tried"
        if self.quota_failures and self.quota_failures == len(self.failures):
            return QuotaError(f"{instance_type} could not be launched in {where}: {detail}.",
                              hint="To launch it: " + "; ".join(dict.fromkeys(self.quota_hints)) + ".")
        hints = list(dict.fromkeys(self.hints + [h[0].upper() + h[1:] + "." for h in self.quota_hints]))
        hints.append("Add regions (resources.regions / EPHEMERA_AWS_REGIONS) or allow other instance "
                     "types; ephemera tries the plan's next offer.")
        return NoCapacityError(f"no capacity for {instance_type} in {where}: {detail}.",
                               hint=" ".join(hints))


def wants_spot(spec: LaunchSpec, opts: Options) -> bool:
    return bool(spec.offer.spot or opts.get("spot"))


class Failover:
    """Markets, failures and prices of a launch (mixed into the provider)."""

    quotas: Any
    spot_unavailable: str | None
    skipped_families: dict[tuple[str, str], str]

    def offers(self, request: OfferRequest) -> list[Offer]:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def _catalog_price(self, instance_type: str, region: str, spot: bool) -> tuple[float, str] | None:
        """The catalog's hourly price of a type in a region (the built-in catalog moves a
        price from another region and says so in the source)."""
        for offer in self.offers(OfferRequest(regions=(region,), instance_type=instance_type)):
            if offer.instance_type == instance_type and offer.region == region and offer.spot == spot:
                return offer.price_per_hour, offer.price_source
        return None

    def _market_price(self, offer: Offer, region: str, market: str) -> tuple[float, str] | None:
        spot = market == "spot"
        if offer.spot == spot and offer.region in (None, region):
            return offer.price_per_hour, offer.price_source
        return self._catalog_price(offer.instance_type, region, spot)

    def _markets(self, spec: LaunchSpec, opts: Options, region: str,
                 attempt: Attempt) -> list[str]:
        """The markets to try in ``region``, in order: spot first when asked, then
        on-demand when the job allows the fallback; minus what the account cannot use
        (spot without its role, a quota below the offer's vCPUs) and an on-demand price
        above the cap (spot is capped by its MaxPrice)."""
        spot = wants_spot(spec, opts)
        if not spot:
            markets = ["on-demand"]
        elif opts.get("spot_fallback", True):
            markets = ["spot", "on-demand"]
        else:
            markets = ["spot"]
        if "spot" in markets and self.spot_unavailable:
            markets.remove("spot")
            attempt.failures.append(f"{region}: spot skipped ({self.spot_unavailable})")
        kept = []
        for market in markets:
            short = self.quotas.shortfall(region, spec.offer.instance_type, market, spec.offer.vcpus)
            if short is not None:
                attempt.quota(short.reason(), short.hint())
                continue
            refusal = self._price_refusal(spec, opts, region, market, fallback=spot)
            if refusal:
                attempt.failures.append(refusal)
                continue
            kept.append(market)
        return kept

    def _price_refusal(self, spec: LaunchSpec, opts: Options, region: str, market: str,
                       *, fallback: bool) -> str | None:
        cap = opts.get("max_price_per_hour")
        if cap is None or market == "spot":
            return None
        what = "on-demand fallback" if fallback else "on-demand"
        known = self._market_price(spec.offer, region, "on-demand")
        if known is None:
            return (f"{region}: {what} refused: no on-demand price is known for "
                    f"{spec.offer.instance_type} there, so max_price_per_hour ${float(cap):.4g}/h "
                    "cannot be checked")
        if known[0] > float(cap):
            return (f"{region}: {what} refused: ${known[0]:.4g}/h ({known[1]}) is above "
                    f"max_price_per_hour ${float(cap):.4g}/h")
        return None

    def _after_failure(self, exc: Exception, spec: LaunchSpec, region: str, subnet: str,
                       market: str, attempt: Attempt) -> str:
        """What a failed RunInstances means: "subnet" (try the next one), "market" (no
        more of this market here), or raise (SkipRegion or a typed error)."""
        if not hasattr(exc, "response") and not is_boto_error(exc):
            raise exc
        code, kind = error_code(exc), classify(exc)
        place = f"{region}/{subnet} ({market})"
        if kind is Kind.CAPACITY:
            attempt.failures.append(f"{place}: {code}")
            return "subnet"
        if kind is Kind.SPOT_UNAVAILABLE and market == "spot":
            self.spot_unavailable = f"{code}: no spot service-linked role in this account"
            attempt.failures.append(f"{place}: {code} (spot is not available in this account)")
            attempt.hints.append(SPOT_ROLE_HINT)
            attempt.notes.append("spot is not available in this account "
                                 f"({code}), so this is an on-demand instance. {SPOT_ROLE_HINT}")
            return "market"
        if kind is Kind.QUOTA:
            attempt.quota(f"{place}: {code}: {error_text(exc)}",
                          f"raise {QUOTA_CODES.get(code, code)} in {region}")
            if market == "spot":
                return "market"  # spot quota: on-demand may still be allowed
            family = spec.offer.instance_type.split(".")[0]
            self.skipped_families[(region, family)] = code
            raise SkipRegion(code) from exc
        if code == "InvalidParameterCombination":
            attempt.failures.append(
                f"{region}: {spec.offer.instance_type} skipped here: {code}: {error_text(exc)} "
                "(AWS refuses this instance type with these launch settings in this region)")
            raise SkipRegion(code) from exc
        raise to_ephemera_error(exc, "RunInstances", region) from exc

    def _billing(self, spec: LaunchSpec, region: str, market: str,
                 raw: Mapping[str, Any]) -> dict[str, str]:
        """Market, zone and hourly price of what was launched (written to Instance.data,
        read by the cost report). Spot is priced from the zone's price history when
        AWS gives it, else from the catalog; on-demand from the plan or the catalog."""
        zone = text(mapping(raw.get("Placement")).get("AvailabilityZone"))
        priced: tuple[float, str] | None = None
        if market == "spot":
            from ephemera_providers.aws_prices import spot_price_now

            now = spot_price_now(self, spec.offer.instance_type, region, zone)
            if now is not None:
                priced = (now, f"AWS spot price history {zone or region} at launch")
        if priced is None:
            priced = self._market_price(spec.offer, region, market)
        if priced is None and market == "spot":
            bound = self._market_price(spec.offer, region, "on-demand")
            if bound is not None:
                priced = (bound[0], f"{bound[1]} (on-demand price, the most spot can cost)")
        out = {"market": market, "availability_zone": zone}
        if priced is not None:
            out.update(price_per_hour=f"{priced[0]:.6g}", price_source=priced[1])
        return out
