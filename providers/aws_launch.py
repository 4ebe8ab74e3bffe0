"""Launching an EC2 instance for a run, region by region with failover: the run's
regions, an instance left by an earlier attempt of the same run, the key pair and
security group, RunInstances with its parameters (see ``aws`` for the whole story).

A mixin of :class:`ephemera_providers.aws.AWSProvider`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ephemera_providers.aws_bake import BAKED_SLACK_GIB, INIT_RATE_MIB_S
from ephemera_providers.aws_common import (
    Options,
    bad_answer,
    data_from_instance,
    entries,
    resource_name,
    tag_key,
    to_tags,
)
from ephemera_providers.aws_errors import (
    Kind,
    classify_code,
)
from ephemera_providers.aws_failover import Attempt, wants_spot
from ephemera_providers.aws_resources import SkipRegion, baked_image_id
from ephemera_providers.aws_userdata import boot_weights, user_data
from ephemera_providers.ssh import home_workroot

from ephemera.errors import ConfigError, EphemeraError
from ephemera.provider import (
    LABEL_RUN_ID,
    Instance,
    LaunchSpec,
)

# Room for the job's image and the model weights when the launch spec gives no size.
DEFAULT_DATA_GIB = 60


def root_volume_gib(disk_gib: int | None, image_gib: int) -> int:
    """The root volume's size: the AMI's own disk (OS, drivers, Docker) plus the room the
    job needs on top of it, ``disk_gib`` (the plan sizes it for the vLLM image and the
    model's files; ``resources.disk_gib`` overrides it), else a default room."""
    return image_gib + int(disk_gib or DEFAULT_DATA_GIB)


class Launching:
    """``launch`` and its steps; relies on the provider's calls, settings and resources."""

    settings: Any

    def launch(self, spec: LaunchSpec) -> Instance:
        self._check_instance_profile(spec)
        opts = Options(spec.options)
        regions = self._launch_regions(spec, opts)
        existing = self._existing_instance(spec.run_id, self._recorded(spec.run_id))
        if existing is not None:
            return existing
        attempt = Attempt()
        for region in regions:
            instance = self._try_region(spec, opts, region, attempt)
            if instance is not None:
                return instance
        raise attempt.error(spec.offer.instance_type, regions)

    def _check_instance_profile(self, spec: LaunchSpec) -> None:
        """Caches in S3 are read and written by the instance with its own credentials."""
        s3_caches = spec.options.get("s3_caches") or {}
        if s3_caches and not self.settings.aws_instance_profile:
            field, url = next(iter(s3_caches.items()))
            raise ConfigError(f"{field}: {url} is read and written by the instance itself; set "
                              "the aws_instance_profile setting (EPHEMERA_AWS_INSTANCE_PROFILE) to "
                              "an instance profile whose role may use that prefix (README: "
                              "Running on AWS)")

    def _launch_regions(self, spec: LaunchSpec, opts: Options) -> list[str]:
        listed = list(opts.get("regions") or []) or list(self.settings.aws_regions)
        if listed:
            first = [spec.offer.region] if spec.offer.region in listed else []
            return list(dict.fromkeys(first + listed))
        return [spec.offer.region or self.default_region()]

    def _existing_instance(self, run_id: str, regions: list[str]) -> Instance | None:
        """Launch is idempotent on the run id: a live instance tagged with it, in a region
        an earlier launch of the run tried, is reused."""
        for region in regions:
            try:
                found = self._describe(region, [
                    {"Name": f"tag:{tag_key(LABEL_RUN_ID)}", "Values": [run_id]},
                    {"Name": "instance-state-name", "Values": ["pending", "running"]}])
            except EphemeraError as exc:
                if classify_code(exc) is Kind.REGION_DISABLED:
                    continue
                raise
            for raw in found:
                return self._instance_from(raw, region, data=data_from_instance(raw, region))
        return None

    def _try_region(self, spec: LaunchSpec, opts: Options, region: str,
                    attempt: Attempt) -> Instance | None:
        """One region: record it, pick the markets quotas and the price cap allow, set up
        the key and group, try RunInstances. None means "go on with the next region"."""
        family = spec.offer.instance_type.split(".")[0]
        skipped = self.skipped_families.get((region, family))
        if skipped:
            attempt.failures.append(f"{region}: {family} skipped ({skipped})")
            return None
        self._record_region(spec, opts, region)
        created: dict[str, str] = {}
        try:
            markets = self._markets(spec, opts, region, attempt)
            if not markets:
                return None
            instance = self._launch_in_region(spec, opts, region, markets, created, attempt)
        except SkipRegion:
            instance = None
        except EphemeraError as exc:
            self._delete_created(region, created)
            if classify_code(exc) is not Kind.REGION_DISABLED:
                raise
            attempt.failures.append(f"{region}: skipped, the region is not enabled for this "
                                    f"account (OptInRequired)")
            attempt.hints.append("Enable the region (AWS console > Account > AWS Regions) or "
                                 "remove it from resources.regions.")
            return None
        except BaseException:
            self._delete_created(region, created)
            raise
        if instance is None:
            self._delete_created(region, created)
        return instance

    def _launch_in_region(self, spec: LaunchSpec, opts: Options, region: str, markets: list[str],
                          created: dict[str, str], attempt: Attempt) -> Instance | None:
        ami = self._resolve_ami(region, opts)
        baked = ami == baked_image_id(opts, region)
        root_device, image_gib = self._image_root(region, ami)
        subnets, vpc_id = self._subnets(region, spec.offer.instance_type, opts, attempt.failures)
        key_name = self._ensure_key(region, spec, opts, created)
        group_id = self._ensure_group(region, spec, opts, vpc_id, created)
        # A baked AMI's disk already holds the image and the model: only slack on top.
        disk_gib = image_gib + BAKED_SLACK_GIB if baked else root_volume_gib(spec.disk_gib, image_gib)
        labels = self._labels(spec, opts)
        for market in markets:
            if market == "spot" and self.spot_unavailable:
                continue
            for subnet in subnets:
                params = self._run_params(spec, opts, ami, root_device, disk_gib, key_name,
                                          group_id, subnet, market, labels, region)
                if baked:   # filled from S3 at this rate, not at the pace of first reads
                    params["BlockDeviceMappings"][0]["Ebs"]["VolumeInitializationRate"] = INIT_RATE_MIB_S
                try:
                    reply = self._call_raw("ec2", region, "run_instances", **params)
                except Exception as exc:  # noqa: BLE001 - sorted by _after_failure
                    if self._after_failure(exc, spec, region, subnet, market, attempt) == "subnet":
                        continue
                    break
                launched = entries(reply, "Instances", f"RunInstances in {region}")
                if not launched:
                    raise bad_answer(f"RunInstances in {region}", "Instances", [], "one instance")
                raw = launched[0]
                data = {
                    "region": region,
                    "ami": ami,
                    "baked": "1" if baked else "",
                    "subnet_id": subnet,
                    "key_name": key_name,
                    "key_owned": "1" if created.get("key_name") else "",
                    "security_group_id": group_id,
                    "group_owned": "1" if created.get("security_group_id") else "",
                    "ssh_user": str(opts.get("ssh_user") or "ubuntu"),
                    "key_path": spec.ssh_private_key_path or "",
                    "disk_gib": str(disk_gib),
                    "regions": ",".join(self._recorded(spec.run_id) or [region]),
                    **self._billing(spec, region, market, raw),
                }
                if market == "on-demand" and wants_spot(spec, opts) and not attempt.notes:
                    attempt.notes.append("spot could not be launched (" + "; ".join(
                        attempt.failures[-3:]) + "), so this is an on-demand instance")
                if attempt.notes:
                    data["notes"] = " ".join(attempt.notes)
                instance = self._instance_from(raw, region, data=data, labels=labels)
                return instance.evolve(message=data.get("notes") or instance.message)
        return None

    def _run_params(self, spec: LaunchSpec, opts: Options, ami: str, root_device: str,
                    disk_gib: int, key_name: str, group_id: str, subnet: str, market: str,
                    labels: Mapping[str, str], region: str) -> dict[str, Any]:
        name = resource_name(spec.run_id)
        tags = to_tags(labels, name)
        specs = [{"ResourceType": "instance", "Tags": tags},
                 {"ResourceType": "volume", "Tags": tags}]
        params: dict[str, Any] = {
            "ImageId": ami,
            "InstanceType": spec.offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "KeyName": key_name,
            "UserData": self._user_data(spec, str(opts.get("ssh_user") or "ubuntu")),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "HttpPutResponseHopLimit": 1},
            "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": {
                "VolumeSize": disk_gib, "VolumeType": "gp3", "DeleteOnTermination": True,
                "Encrypted": True}}],
            "TagSpecifications": specs,
            # Same token for the same attempt: a retried call cannot start a second machine.
            "ClientToken": f"{spec.run_id}-{region}-{subnet}-{market}"[-64:],
            # The address is asked for explicitly: a subnet that does not auto-assign one
            # would otherwise give a machine SSH cannot reach, billed until the boot
            # timeout. With aws_use_private_ip there is none at all (bastion or VPN).
            "NetworkInterfaces": [{
                "DeviceIndex": 0, "SubnetId": subnet, "Groups": [group_id],
                "AssociatePublicIpAddress": not self.settings.aws_use_private_ip,
                "DeleteOnTermination": True}],
        }
        profile = self.settings.aws_instance_profile
        if profile:
            params["IamInstanceProfile"] = {"Arn" if profile.startswith("arn:") else "Name": profile}
        if market == "spot":
            spot_options: dict[str, Any] = {"SpotInstanceType": "one-time",
                                            "InstanceInterruptionBehavior": "terminate"}
            cap = opts.get("max_price_per_hour")
            if cap is not None:
                spot_options["MaxPrice"] = f"{float(cap):.4f}"  # AWS never bills spot above it
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot_options}
        return params

    def _user_data(self, spec: LaunchSpec, login_user: str) -> str:
        """The boot script: dead-man switch, then the boot work (image pull, and the
        download of weights that need no token, the launch options' ``boot_weights``)."""
        boot_dir = self.settings.aws_boot_dir
        request = spec.options.get("boot_weights")
        weights = ""
        if isinstance(request, Mapping) and request.get("repo"):
            workroot = home_workroot(self.settings.ssh_workroot, login_user)
            weights = boot_weights(request, login_user, self.settings.hub_python, boot_dir, workroot)
        return user_data(spec.run_id, spec.expires_at, login_user, spec.image,
                         boot_dir=boot_dir, weights=weights)

    # -------------------------------------------------------------------- poll
