"""The reaper: find instances by their ephemera labels and terminate the expired ones.

It only acts on instances that carry the run-id and expires-at labels with an
expiry in the past, so running it with no settings can never touch anything else.
Given an owner, it also leaves alone (and counts) what carries another owner label.
One instance that cannot be judged or terminated never stops the others: it is
reported (and makes ``ephemera reap`` exit non-zero) and the reaper goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ephemera.errors import IncompleteSearchError
from ephemera.lifecycle.teardown import terminate_and_verify
from ephemera.provider import (
    LABEL_EXPIRES_AT,
    LABEL_OWNER,
    LABEL_RUN_ID,
    InstanceState,
    parse_time,
)

KEPT, IGNORED, FOREIGN = "kept", "ignored", "foreign"


@dataclass
class ReapReport:
    expired: list[dict[str, Any]] = field(default_factory=list)
    kept: int = 0
    # Resources carrying another owner label (or none), left alone because of the owner.
    foreign: int = 0
    owner: str | None = None     # whose resources were looked at; None: every owner's
    skipped: list[str] = field(default_factory=list)
    # Providers whose search could not look everywhere (a region that did not answer):
    # what is there is unknown, so the reap is not complete.
    incomplete: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"expired": self.expired, "kept": self.kept, "skipped": self.skipped,
                "incomplete": self.incomplete, "owner": self.owner,
                "foreign_owner_skipped": self.foreign}


def reap(provider_names: list[str] | None, *, owner: str | None, dry_run: bool, now: datetime,
         log: Callable[[str], None]) -> ReapReport:
    """Terminate the expired resources of ``owner`` (of every owner when it is None)."""
    from ephemera.registry import get_provider
    from ephemera.registry import provider_names as all_names

    report = ReapReport(owner=owner)
    for name in provider_names or all_names():
        try:
            provider = get_provider(name)
            found = provider.find({})
        except IncompleteSearchError as exc:   # reap what was found; report where it could not look
            found = exc.found
            report.incomplete.append(f"{name}: {exc}")
            log(f"{name}: the search was incomplete ({exc}); reaping what was found")
        except Exception as exc:  # noqa: BLE001 - one unusable provider must not stop the others
            report.skipped.append(f"{name}: {exc}")
            log(f"skipping provider {name}: {exc}")
            continue
        for instance in found:
            try:
                item = _reap_one(name, provider, instance, owner=owner, dry_run=dry_run, now=now,
                                 log=log, terminate_and_verify=terminate_and_verify)
            except Exception as exc:  # noqa: BLE001 - go on with the other instances
                item = {"provider": name, "id": str(getattr(instance, "id", "?")),
                        "run_id": str(getattr(instance, "run_id", "?")), "expires_at": "?",
                        "owner": None, "verified": False,
                        "problems": [f"{type(exc).__name__}: {exc}"]}
                log(f"{name}: could not reap {item['id']}: {type(exc).__name__}: {exc}")
            if item == KEPT:
                report.kept += 1
            elif item == FOREIGN:
                report.foreign += 1
            elif isinstance(item, dict):
                report.expired.append(item)
        if provider.capabilities({}).reaps_orphans:
            try:
                for orphan in provider.reap_orphans(now=now, owner=owner, dry_run=dry_run):
                    report.expired.append({"provider": name, "verified": True, **orphan})
            except Exception as exc:  # noqa: BLE001
                log(f"{name}: orphan cleanup failed: {exc}")
    return report


def _reap_one(name: str, provider: Any, instance: Any, *, owner: str | None, dry_run: bool,
              now: datetime, log: Callable[[str], None],
              terminate_and_verify: Callable[..., tuple[bool, list[str]]]) -> dict[str, Any] | str:
    """The report item of one instance (what was, or would be, done), FOREIGN when an
    owner is given and the instance carries another, KEPT when it is not expired or has
    no readable expiry, IGNORED when it is not an ephemera instance or is gone already."""
    labels = instance.labels
    if instance.state == InstanceState.TERMINATED or LABEL_RUN_ID not in labels:
        return IGNORED
    if owner and labels.get(LABEL_OWNER) != owner:
        return FOREIGN
    try:
        expires = parse_time(labels[LABEL_EXPIRES_AT])
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError):
        return KEPT  # no readable expiry: never ours to judge
    if expires > now:
        return KEPT
    item = {"provider": name, "id": instance.id, "run_id": labels[LABEL_RUN_ID],
            "expires_at": labels[LABEL_EXPIRES_AT], "owner": labels.get(LABEL_OWNER),
            "verified": False}
    if not dry_run:
        log(f"terminating expired {name} instance {instance.id} (run {labels[LABEL_RUN_ID]})")
        ok, problems = terminate_and_verify(provider, instance, deadline=time.monotonic() + 300,
                                            log=log)
        item["verified"] = ok
        item["problems"] = problems
    return item
