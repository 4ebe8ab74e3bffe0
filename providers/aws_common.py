"""Small pieces the aws provider's modules share: tags, names, the job's AWS options,
and what terminate needs rebuilt from an instance's own description."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from ephemera.errors import ConfigError, InfraError
from ephemera.provider import LABEL_KEYS, LABEL_RUN_ID, Instance, InstanceState

TAG_PREFIX = "ephemera:"
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
# What an EC2 resource id (instance, group, subnet, AMI) may look like.
_RESOURCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Longest text from an AWS answer that goes into a message.
SHOWN_CHARS = 200


# ------------------------------------------------ reading AWS answers defensively

def shown(value: Any) -> str:
    """A value from an AWS answer as a short, printable piece of a message."""
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
    return text.encode("unicode_escape").decode("ascii")


def bad_answer(where: str, field: str, value: Any, wanted: str) -> InfraError:
    """The error for an AWS answer whose ``field`` is not what the API documents."""
    return InfraError(f"AWS {where} answered with {field} = {shown(value)[:80]}, "
                      f"which is not {wanted}.")


def mapping(value: Any) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else an empty one (an optional sub-object)."""
    return value if isinstance(value, Mapping) else {}


def text(value: Any) -> str:
    """``value`` when it is a string, else "" (an optional string field)."""
    return value if isinstance(value, str) else ""


def entries(reply: Any, key: str, where: str, of: tuple[type, ...] = (Mapping,)) -> list[Any]:
    """The list ``reply[key]`` of objects (missing: empty); anything else is an error."""
    items = mapping(reply).get(key, [])
    if not isinstance(items, list | tuple):
        raise bad_answer(where, key, items, "a list")
    for index, item in enumerate(items):
        if not isinstance(item, of):
            raise bad_answer(where, f"{key}[{index}]", item, "an object")
    return list(items)


def resource_id(raw: Any, key: str, where: str) -> str:
    """The id ``raw[key]`` (an instance, group, subnet or AMI id)."""
    value = mapping(raw).get(key)
    if not isinstance(value, str) or not _RESOURCE_ID.fullmatch(value):
        raise bad_answer(where, key, value, "an EC2 resource id")
    return value


def instances_of(reply: Any, where: str) -> list[Mapping[str, Any]]:
    """The instances of a DescribeInstances page, each with a well-formed InstanceId."""
    out: list[Mapping[str, Any]] = []
    for index, reservation in enumerate(entries(reply, "Reservations", where)):
        place = f"{where} Reservations[{index}]"
        for raw in entries(reservation, "Instances", place):
            resource_id(raw, "InstanceId", place)
            out.append(raw)
    return out


def state_name(raw: Mapping[str, Any]) -> str:
    """An instance's State.Name ("pending" when missing or not a string)."""
    return text(mapping(raw.get("State")).get("Name")) or "pending"


def tag_key(label: str) -> str:
    """AWS tag key for a label: the four canonical labels get the ``ephemera:`` prefix."""
    return TAG_PREFIX + label if label in LABEL_KEYS else label


def to_tags(labels: Mapping[str, str], name: str | None = None) -> list[dict[str, str]]:
    tags = [{"Key": tag_key(k), "Value": str(v)} for k, v in labels.items()]
    if name and not any(t["Key"] == "Name" for t in tags):
        tags.append({"Key": "Name", "Value": name})
    return tags


def from_tags(tags: Any) -> dict[str, str]:
    """Labels with canonical keys from AWS tags (``Name`` and ``aws:`` tags dropped).
    A tag that is not an object with a string Key and Value is skipped: ephemera's own
    tags always are, so such a tag is someone else's and says nothing about a run."""
    labels: dict[str, str] = {}
    for tag in tags if isinstance(tags, list | tuple) else ():
        if not isinstance(tag, Mapping):
            continue
        key, value = tag.get("Key"), tag.get("Value", "")
        if not isinstance(key, str) or not isinstance(value, str):
            continue
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
    def groups(value: Any) -> list[Mapping[str, str]]:
        listed = value if isinstance(value, list | tuple) else []
        return [g for g in listed if isinstance(g, Mapping) and isinstance(g.get("GroupId"), str)]

    attached = groups(raw.get("SecurityGroups"))
    interfaces = raw.get("NetworkInterfaces")
    for interface in interfaces if isinstance(interfaces, list | tuple) else []:
        attached += groups(mapping(interface).get("Groups"))
    return attached


def data_from_instance(raw: Mapping[str, Any], region: str) -> dict[str, str]:
    """What terminate needs, rebuilt from AWS's own description (reaper, re-launch)."""
    labels = from_tags(raw.get("Tags"))
    name = resource_name(labels.get(LABEL_RUN_ID, ""))
    groups = [g["GroupId"] for g in attached_groups(raw) if g.get("GroupName") == name]
    key_name = text(raw.get("KeyName"))
    return {
        "region": region,
        "key_name": key_name,
        "key_owned": "1" if key_name == name else "",
        "security_group_id": groups[0] if groups else "",
        "group_owned": "1" if groups else "",
        "market": "spot" if raw.get("InstanceLifecycle") == "spot" else "on-demand",
        "availability_zone": text(mapping(raw.get("Placement")).get("AvailabilityZone")),
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
