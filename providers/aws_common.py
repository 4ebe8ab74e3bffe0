"""Small pieces the aws provider's modules share: tags, names, the job's AWS options,
and what terminate needs rebuilt from an instance's own description."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from ephemera.errors import ConfigError
from ephemera.provider import LABEL_KEYS, LABEL_RUN_ID, Instance, InstanceState

TAG_PREFIX = "ephemera:"
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


def tag_key(label: str) -> str:
    """AWS tag key for a label: the four canonical labels get the ``ephemera:`` prefix."""
    return TAG_PREFIX + label if label in LABEL_KEYS else label


def to_tags(labels: Mapping[str, str], name: str | None = None) -> list[dict[str, str]]:
    tags = [{"Key": tag_key(k), "Value": str(v)} for k, v in labels.items()]
    if name and not any(t["Key"] == "Name" for t in tags):
        tags.append({"Key": "Name", "Value": name})
    return tags


def from_tags(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    """Labels with canonical keys from AWS tags (``Name`` and ``aws:`` tags dropped)."""
    labels: dict[str, str] = {}
    for tag in tags or ():
        key, value = tag["Key"], tag.get("Value", "")
        if key == "Name" or key.startswith("aws:"):
            continue
        if key.startswith(TAG_PREFIX) and key[len(TAG_PREFIX):] in LABEL_KEYS:
            key = key[len(TAG_PREFIX):]
        labels[key] = value
    return labels


def matches(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(k) == str(v) for k, v in wanted.items())


def resource_name(run_id: str) -> str:
    return f"ephemera-{run_id}"


def ssh_cidr(configured: str | None, field: str) -> str:
    """The CIDR allowed to reach SSH: the configured one, else this machine's public /32.

    The lookup asks https://checkip.amazonaws.com (AWS's own echo service); it is
    only used when no CIDR is configured, so tests and locked-down runners never
    leave the machine for it.
    """
    if configured:
        return checked_cidr(configured, field)
    import urllib.request

    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=5) as resp:
            address = resp.read().decode().strip()
        ipaddress.ip_address(address)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"could not find this machine's public address for the SSH rule ({exc}).",
            hint="Set EPHEMERA_AWS_SSH_CIDR or resources.aws.ssh_cidr (e.g. 203.0.113.7/32).",
        ) from None
    return f"{address}/32"


def checked_cidr(configured: str, field: str) -> str:
    """A configured SSH CIDR, refused when it opens SSH to more than one small network:
    wider than /24 (/64 for IPv6) or with host bits set (``10.0.0.5/16`` reads as a typo
    for one address). A trailing ``!`` forces it through as written (host bits cleared).
    """
    text = configured.strip()
    forced = text.endswith("!")
    if forced:
        text = text[:-1].strip()
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{field}: '{configured}' is not a CIDR ({exc}).") from None
    if forced:
        return str(network)
    narrowest = 24 if network.version == 4 else 64
    force = f"or end the value with '!' to allow {network} on purpose (e.g. '{network}!')."
    if not _strict_network(text):
        single = ipaddress.ip_network(text.split("/")[0])
        raise ConfigError(f"{field}: '{configured}' has host bits set (its network is {network}).",
                          hint=f"Write {single} for one address, {force}")
    if network.prefixlen < narrowest:
        raise ConfigError(f"{field}: '{configured}' lets {network.num_addresses} addresses reach "
                          f"SSH (wider than /{narrowest}).",
                          hint=f"Use a /{narrowest} or narrower, ideally your own address "
                               f"(e.g. 203.0.113.7/32), {force}")
    return str(network)


def _strict_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError:
        return False
    return True


class Options:
    """The job's AWS options: ``options["aws"]`` first, then top-level keys."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        nested = options.get("aws") if isinstance(options.get("aws"), Mapping) else {}
        self._nested = dict(nested or {})
        self._top = {k: v for k, v in options.items() if k != "aws"}

    def get(self, key: str, default: Any = None) -> Any:
        for source in (self._nested, self._top):
            if source.get(key) not in (None, "", [], {}):
                return source[key]
        return default


def attached_groups(raw: Mapping[str, Any]) -> list[Mapping[str, str]]:
    """Security groups of an instance, from the instance and its network interfaces."""
    attached = list(raw.get("SecurityGroups", []))
    for interface in raw.get("NetworkInterfaces", []):
        attached += interface.get("Groups", [])
    return attached


def data_from_instance(raw: Mapping[str, Any], region: str) -> dict[str, str]:
    """What terminate needs, rebuilt from AWS's own description (reaper, re-launch)."""
    labels = from_tags(raw.get("Tags"))
    name = resource_name(labels.get(LABEL_RUN_ID, ""))
    groups = [g["GroupId"] for g in attached_groups(raw) if g.get("GroupName") == name]
    return {
        "region": region,
        "key_name": raw.get("KeyName", ""),
        "key_owned": "1" if raw.get("KeyName") == name else "",
        "security_group_id": groups[0] if groups else "",
        "group_owned": "1" if groups else "",
        "market": "spot" if raw.get("InstanceLifecycle") == "spot" else "on-demand",
        "availability_zone": (raw.get("Placement") or {}).get("AvailabilityZone", ""),
        "ssh_user": "ubuntu",
    }


def orphan(kind: str, ident: str, region: str, labels: Mapping[str, str]) -> Instance:
    return Instance(provider="aws", id=ident, run_id=labels.get(LABEL_RUN_ID, ""),
                    state=InstanceState.FAILED, labels=dict(labels), region=region,
                    message=f"orphaned {kind} (no live instance uses it)",
                    data={"kind": kind, "region": region})


def is_boto_error(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError

    return isinstance(exc, BotoCoreError)
