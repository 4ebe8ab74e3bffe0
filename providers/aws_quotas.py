"""EC2 vCPU quotas, read from Service Quotas before anything is created in a region.

A new account often has 0 vCPUs for P instances and a few for G; RunInstances would
then fail only after a key pair and a security group were made (and removed again).
Reading the quota first lets launch skip such a region at once and say which quota
to raise. The quotas count vCPUs of all running instances of the class in the region;
the check compares the quota with the offer's vCPUs (what is already running is not
subtracted: RunInstances still reports that case as ``VcpuLimitExceeded``).

A quota that cannot be read (no ``servicequotas:GetServiceQuota`` permission, the
service not answering) is unknown, and launch goes on as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (quota code, quota name) by instance class and market. Codes from the Service Quotas
# console (service "ec2"); the spot codes count the vCPUs of all spot requests.
QUOTAS: dict[tuple[str, str], tuple[str, str]] = {
    ("G", "on-demand"): ("L-DB2E81BA", "Running On-Demand G and VT instances"),
    ("P", "on-demand"): ("L-417A185B", "Running On-Demand P instances"),
    ("G", "spot"): ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    ("P", "spot"): ("L-7212CCBC", "All P Spot Instance Requests"),
}

# The Service Quotas calls a read makes, in order (the second when no value is applied).
QUOTA_OPERATIONS = ("get_service_quota", "get_aws_default_service_quota")

_CLASS = re.compile(r"^(vt|g|p)\d", re.IGNORECASE)


def quota_for(instance_type: str, market: str) -> tuple[str, str] | None:
    """The (code, name) of the vCPU quota a launch of this type draws from, or None for
    classes ephemera does not check (anything but G, VT and P)."""
    match = _CLASS.match(instance_type)
    if not match:
        return None
    letter = "P" if match.group(1).lower() == "p" else "G"
    return QUOTAS.get((letter, market))


@dataclass(frozen=True)
class QuotaShortfall:
    """A region whose quota is below what one instance of the offer needs."""

    region: str
    market: str
    code: str
    name: str
    value: float
    needed: int

    def reason(self) -> str:
        return (f"{self.region} ({self.market}): quota {self.code} '{self.name}' is "
                f"{self.value:g} vCPUs, the instance needs {self.needed}")

    def hint(self) -> str:
        return (f"raise {self.code} ('{self.name}') in {self.region} to at least {self.needed} "
                f"vCPUs in the Service Quotas console (Amazon EC2) or with `aws service-quotas "
                f"request-service-quota-increase --service-code ec2 --quota-code {self.code} "
                f"--desired-value {self.needed} --region {self.region}`")


class QuotaReader:
    """Reads each (region, quota code) once and remembers it for the provider's life.

    ``client_for(region)`` returns a Service Quotas client; each read is one call with
    no retries, since an unreadable quota only means the check is skipped."""

    def __init__(self, client_for: Callable[[str], Any]) -> None:
        self._client_for = client_for
        self._values: dict[tuple[str, str], float | None] = {}

    def value(self, region: str, code: str) -> float | None:
        key = (region, code)
        if key not in self._values:
            self._values[key] = self._read(region, code)
        return self._values[key]

    def _read(self, region: str, code: str) -> float | None:
        try:
            client = self._client_for(region)
        except Exception:  # noqa: BLE001 - no client: the check is skipped
            return None
        for operation in QUOTA_OPERATIONS:
            try:
                reply = getattr(client, operation)(ServiceCode="ec2", QuotaCode=code)
                return quota_value(reply)
            except Exception as exc:  # noqa: BLE001 - unreadable means unknown
                if _code(exc) != "NoSuchResourceException":
                    return None
                # No applied value recorded for this account: the default applies.
        return None

    def shortfall(self, region: str, instance_type: str, market: str,
                  vcpus: int) -> QuotaShortfall | None:
        """The quota that stops one instance of ``instance_type`` in ``region``, if any."""
        quota = quota_for(instance_type, market)
        if quota is None or vcpus <= 0:
            return None
        code, name = quota
        value = self.value(region, code)
        if value is None or value >= vcpus:
            return None
        return QuotaShortfall(region=region, market=market, code=code, name=name,
                              value=value, needed=vcpus)


def quota_value(reply: Any) -> float | None:
    """The Quota.Value of a GetServiceQuota answer: a number of vCPUs, at least 0; None
    (unknown, the check is skipped) for anything else."""
    quota = reply.get("Quota") if isinstance(reply, dict) else None
    value = quota.get("Value") if isinstance(quota, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
