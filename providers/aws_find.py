"""Where a run's resources may be, and the search that looks there.

Launch writes each region down for the run before trying it (``aws_regions``); a
search for one run looks in the settings' regions and every recorded one; the
reaper's search covers every region the account has enabled (or the configured
list) plus every recorded region. Regions are searched in parallel, a failing region
does not stop the others, and a search that could not look everywhere raises
``IncompleteSearchError`` instead of returning a list that looks complete.

A mixin of :class:`ephemera_providers.aws.AWSProvider`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from ephemera_providers import aws_regions
from ephemera_providers.aws_common import (
    LIVE_STATES,
    Options,
    attached_groups,
    bad_answer,
    data_from_instance,
    entries,
    from_tags,
    matches,
    orphan,
    resource_id,
    tag_key,
    text,
)
from ephemera_providers.aws_errors import IncompleteSearchError, Kind, classify_code

from ephemera.errors import EphemeraError, InfraError
from ephemera.provider import LABEL_RUN_ID, Instance, LaunchSpec

# Regions a search looks at in parallel (a reap covers every enabled region).
SEARCH_THREADS = 8
# A reap prunes the region records of runs that expired this long ago.
RECORD_KEEP = timedelta(hours=1)


class RunSearch:
    """Region records and searches by label (mixed into the provider)."""

    settings: Any
    session: Any

    def client(self, service: str, region: str) -> Any:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def default_region(self) -> str:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def _call(self, service: str, region: str, operation: str, **params: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def _describe(self, region: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def _instance_from(self, raw: Mapping[str, Any], region: str, *, data: Mapping[str, str],
                       labels: Mapping[str, str] | None = None) -> Instance:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def _record_region(self, spec: LaunchSpec, opts: Options, region: str) -> None:
        """Write down, before anything is created there, that this run tries ``region``,
        so that a teardown in another process looks there. A region that cannot be
        recorded is only tried when ``find`` searches it anyway."""
        state_dir = getattr(self.settings, "state_dir", None)
        if state_dir is None:
            return
        options = {"subnet_ids": list(opts.get("subnet_ids") or []),
                   "profile": self._profile()}
        try:
            aws_regions.add_region(state_dir, spec.run_id, region, expires_at=spec.expires_at,
                                   options=options)
        except (OSError, ValueError) as exc:
            if region in self.find_regions():
                return
            raise InfraError(
                f"could not record that run {spec.run_id} tries {region} "
                f"({aws_regions.records_dir(state_dir)}): {exc}; not launching where a later "
                "teardown would not look.",
                hint="Make the state directory (EPHEMERA_STATE_DIR) writable.") from exc

    def _profile(self) -> str:
        """The AWS profile this process chose explicitly ("" for the default chain)."""
        inner = getattr(self.session, "_session", None)
        return str(getattr(inner, "profile", None) or "")

    def _profile_mismatch(self, run_id: str) -> str | None:
        """Why this process cannot speak for a run launched with another AWS profile."""
        state_dir = getattr(self.settings, "state_dir", None)
        if state_dir is None:
            return None
        try:
            recorded = aws_regions.read_record(state_dir, run_id).get("options") or {}
        except ValueError:
            return None
        launched, here = str(recorded.get("profile") or ""), self._profile()
        if "profile" not in recorded or launched == here:
            return None
        how = f"AWS_PROFILE={launched}" if launched else "AWS_PROFILE unset"
        return (f"run {run_id} was launched with AWS profile '{launched or '(none)'}' and this "
                f"process uses '{here or '(none)'}', so it may be looking at another account; "
                f"search again with {how}")

    def _recorded(self, run_id: str) -> list[str]:
        state_dir = getattr(self.settings, "state_dir", None)
        if state_dir is None:
            return []
        try:
            return aws_regions.recorded_regions(state_dir, run_id)
        except ValueError:
            return []

    def find_regions(self) -> list[str]:
        """The regions of the settings (or the default one)."""
        return list(dict.fromkeys(self.settings.aws_regions or [self.default_region()]))

    def run_regions(self, run_id: str) -> list[str]:
        """Where a run's resources may be: the settings' regions and every region its
        launches recorded."""
        return list(dict.fromkeys(self.find_regions() + self._recorded(run_id)))

    def reap_regions(self, failures: list[str]) -> list[str]:
        """Every region the account has enabled (or the configured list), plus every region
        a recorded run tried. A failure to list the enabled regions goes to ``failures``."""
        regions = list(self.settings.aws_regions)
        if not regions:
            region = self.default_region()
            try:
                reply = self._call("ec2", region, "describe_regions", Filters=[
                    {"Name": "opt-in-status", "Values": ["opt-in-not-required", "opted-in"]}])
                where = f"DescribeRegions in {region}"
                regions = sorted(_region_name(r, where) for r in entries(reply, "Regions", where))
            except EphemeraError as exc:
                failures.append(f"listing the enabled regions from {region}: {exc}")
            regions = regions or [region]
        state_dir = getattr(self.settings, "state_dir", None)
        recorded = aws_regions.all_recorded_regions(state_dir) if state_dir is not None else []
        return list(dict.fromkeys(regions + recorded))

    def find(self, labels: Mapping[str, str], regions: Iterable[str] | None = None) -> list[Instance]:
        """Live instances carrying all ``labels``, plus security groups and key pairs
        tagged by ephemera that no live instance uses any more (state FAILED, with
        ``data["kind"]`` saying which). The reaper and teardown treat those like
        instances: ``terminate`` deletes them and ``poll`` says TERMINATED once they are
        gone. Only resources carrying the ``ephemera:run-id`` tag are ever returned.

        Where: ``regions`` when given; for a run id, the settings' regions and every
        region the run's launches recorded; otherwise (the reaper) every enabled region.
        A region that cannot be searched does not stop the others, but the search then
        raises :class:`IncompleteSearchError` (with what was found) instead of returning
        a list that would look complete; so does a search for a run launched with another
        AWS profile than this process's. A complete search without a run id also prunes
        the region records of runs that expired and left nothing."""
        failures: list[str] = []
        run_id = labels.get(LABEL_RUN_ID)
        if regions is not None:
            where = list(regions)
        elif run_id:
            where = self.run_regions(str(run_id))
            mismatch = self._profile_mismatch(str(run_id))
            if mismatch:
                failures.append(mismatch)
        else:
            where = self.reap_regions(failures)
        found: list[Instance] = []
        for region_found, failure in self._search_regions(where, labels):
            found += region_found
            if failure:
                failures.append(failure)
        if failures:
            raise IncompleteSearchError(found, failures)
        if not run_id and regions is None:
            self._prune_records(found)
        return found

    def _search_regions(self, regions: list[str], labels: Mapping[str, str],
                        ) -> list[tuple[list[Instance], str | None]]:
        """(found, failure) per region, in order; several regions are searched at once."""

        def search(region: str) -> tuple[list[Instance], str | None]:
            try:
                return self._find_in(region, labels), None
            except Exception as exc:  # noqa: BLE001 - go on with the other regions
                if classify_code(exc) is Kind.REGION_DISABLED:
                    return [], None  # nothing can be in a region the account has not enabled
                return [], f"{region}: {type(exc).__name__}: {exc}"

        if len(regions) <= 1:
            return [search(r) for r in regions]
        from concurrent.futures import ThreadPoolExecutor

        for region in regions:
            self.client("ec2", region)  # made here: a boto3 session is not thread-safe
        with ThreadPoolExecutor(max_workers=min(SEARCH_THREADS, len(regions))) as pool:
            return list(pool.map(search, regions))

    def _find_in(self, region: str, labels: Mapping[str, str]) -> list[Instance]:
        ours = [{"Name": "tag-key", "Values": [tag_key(LABEL_RUN_ID)]}]
        wanted = [{"Name": f"tag:{tag_key(k)}", "Values": [str(v)]} for k, v in labels.items()]
        live = self._describe(region, ours + [
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
        used_groups = {g["GroupId"] for raw in live for g in attached_groups(raw)}
        used_keys = {text(raw.get("KeyName")) for raw in live}
        found = [self._instance_from(raw, region, data=data_from_instance(raw, region))
                 for raw in live if matches(from_tags(raw.get("Tags")), labels)]
        where = f"DescribeSecurityGroups in {region}"
        for group in entries(self._call("ec2", region, "describe_security_groups",
                                        Filters=ours + wanted), "SecurityGroups", where):
            group_id = resource_id(group, "GroupId", where)
            if group_id not in used_groups:
                found.append(orphan("security-group", group_id, region,
                                    from_tags(group.get("Tags"))))
        where = f"DescribeKeyPairs in {region}"
        for key in entries(self._call("ec2", region, "describe_key_pairs",
                                      Filters=ours + wanted), "KeyPairs", where):
            name = resource_id(key, "KeyName", where)
            if name not in used_keys:
                found.append(orphan("key-pair", name, region, from_tags(key.get("Tags"))))
        return found

    def _prune_records(self, found: list[Instance]) -> None:
        state_dir = getattr(self.settings, "state_dir", None)
        if state_dir is None:
            return
        try:
            aws_regions.prune(state_dir, now=datetime.now(UTC) - RECORD_KEEP,
                              keep_run_ids={i.run_id for i in found})
        except OSError:
            pass  # the records stay; the next complete reap tries again


def _region_name(entry: Mapping[str, Any], where: str) -> str:
    name = entry.get("RegionName")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9-]{1,64}", name):
        raise bad_answer(where, "RegionName", name, "a region name")
    return name
