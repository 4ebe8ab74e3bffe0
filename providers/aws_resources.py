"""The resources a launch sets up around an instance, and removes again: the AMI and
its root disk, the subnets to try, the run's key pair and its security group.

A mixin of :class:`ephemera_providers.aws.AWSProvider`: it relies on the provider's
``_call``/``_call_raw`` (one API call with retries) and ``settings``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ephemera_providers.aws_common import (
    TAG_PREFIX,
    Options,
    bad_answer,
    entries,
    mapping,
    resource_id,
    resource_name,
    ssh_cidr,
    text,
    to_tags,
)
from ephemera_providers.aws_errors import Kind, classify, error_code, to_ephemera_error

from ephemera.errors import ConfigError
from ephemera.provider import LABEL_KEYS, LaunchSpec

DLAMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)


# The largest EBS volume (io2 Block Express, 64 TiB) and the shape of a device name.
MAX_VOLUME_GIB = 65536
DEVICE_NAME = re.compile(r"/dev/[a-z0-9]{1,32}")


def baked_image_id(opts: Options, region: str) -> str | None:
    """The baked AMI the plan chose (``machine_image`` in the launch options), when it is
    in ``region`` (an AMI id is valid in its own region only)."""
    image = opts.get("machine_image")
    if isinstance(image, Mapping) and image.get("region") == region and image.get("id"):
        return str(image["id"])
    return None


class SkipRegion(Exception):
    """Internal: stop trying this region (quota, no subnet, refused offer), go on with
    the next one. The reason is already in the launch's list of failures."""


class LaunchResources:
    """Set-up and clean-up calls of a launch (mixed into the provider)."""

    settings: Any

    def _call(self, service: str, region: str, operation: str, **params: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def _call_raw(self, service: str, region: str, operation: str, **params: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def _labels(self, spec: LaunchSpec, opts: Options) -> dict[str, str]:
        labels = {str(k): str(v) for k, v in spec.labels.items()}
        for key, value in (opts.get("tags") or {}).items():
            labels.setdefault(str(key), str(value))
        for key in labels:
            if key.lower().startswith("aws:") or (key.startswith(TAG_PREFIX) and key[len(TAG_PREFIX):] not in LABEL_KEYS):
                raise ConfigError(f"resources.tags: tag key '{key}' is reserved (aws: and ephemera: prefixes).")
            if len(key) > 128 or len(labels[key]) > 256:
                raise ConfigError(f"resources.tags: tag '{key}' is too long (key 128, value 256 characters).")
        missing = [k for k in LABEL_KEYS if k not in labels]
        if missing:
            raise ConfigError(f"launch spec labels lack {', '.join(missing)}.")
        return labels

    def _resolve_ami(self, region: str, opts: Options) -> str:
        """The job's AMI, else the plan's baked AMI in this region, else the setting's,
        else AWS's Deep Learning Base GPU AMI."""
        ami = opts.get("ami") or baked_image_id(opts, region) or self.settings.aws_ami
        if ami:
            return str(ami)
        from botocore.exceptions import ClientError

        try:
            reply = self._call_raw("ssm", region, "get_parameter", Name=DLAMI_PARAMETER)
        except ClientError as exc:
            if error_code(exc) == "ParameterNotFound":
                raise ConfigError(
                    f"the Deep Learning Base GPU AMI parameter {DLAMI_PARAMETER} does not exist in {region}.",
                    hint="Set EPHEMERA_AWS_AMI or resources.aws.ami to a GPU AMI with Docker and the NVIDIA toolkit.",
                ) from None
            raise to_ephemera_error(exc, "ssm:GetParameter (Deep Learning AMI)", region) from exc
        return resource_id(mapping(reply).get("Parameter"), "Value",
                           f"ssm:GetParameter {DLAMI_PARAMETER} in {region}")

    def _image_root(self, region: str, ami: str) -> tuple[str, int]:
        """Root device name and the size of its snapshot (the disk must be at least that)."""
        from botocore.exceptions import ClientError

        where = f"DescribeImages {ami} in {region}"
        try:
            images = entries(self._call_raw("ec2", region, "describe_images", ImageIds=[ami]),
                             "Images", where)
        except ClientError as exc:
            if classify(exc) in (Kind.INVALID, Kind.NOT_FOUND):
                images = []
            else:
                raise to_ephemera_error(exc, "DescribeImages", region) from exc
        if not images:
            raise ConfigError(f"AMI {ami} does not exist in {region} (EPHEMERA_AWS_AMI / resources.aws.ami).")
        root = images[0].get("RootDeviceName") or "/dev/sda1"
        if not isinstance(root, str) or not DEVICE_NAME.fullmatch(root):
            raise bad_answer(where, "RootDeviceName", root, "a device name")
        size = 0
        for index, device in enumerate(entries(images[0], "BlockDeviceMappings", where)):
            if device.get("DeviceName") == root:
                size = mapping(device.get("Ebs")).get("VolumeSize") or 0
                if type(size) is not int or not 0 <= size <= MAX_VOLUME_GIB:
                    raise bad_answer(where, f"BlockDeviceMappings[{index}].Ebs.VolumeSize", size,
                                     f"a size in GiB from 0 to {MAX_VOLUME_GIB}")
        return root, size

    def _subnets(self, region: str, instance_type: str, opts: Options,
                 failures: list[str]) -> tuple[list[str], str | None]:
        """Subnets to try in order, and their VPC. Configured subnets are used as given;
        otherwise the default VPC's default subnets in zones that offer the type."""
        wanted = list(opts.get("subnet_ids") or [])
        if not wanted and self.settings.aws_subnet_id:
            wanted = [self.settings.aws_subnet_id]
        where = f"DescribeSubnets in {region}"
        if wanted:
            found = entries(self._call("ec2", region, "describe_subnets", Filters=[
                {"Name": "subnet-id", "Values": wanted}]), "Subnets", where)
            by_id = {resource_id(s, "SubnetId", where): s for s in found}
            subnets = [s for s in wanted if s in by_id]
            if not subnets:
                failures.append(f"{region}: none of the subnets {', '.join(wanted)} is in this region")
                raise SkipRegion("subnets")
            return list(subnets), resource_id(by_id[subnets[0]], "VpcId", where)
        vpcs = entries(self._call("ec2", region, "describe_vpcs", Filters=[
            {"Name": "is-default", "Values": ["true"]}]), "Vpcs", f"DescribeVpcs in {region}")
        if not vpcs:
            raise ConfigError(
                f"{region} has no default VPC, so ephemera does not know where to launch.",
                hint="Set EPHEMERA_AWS_SUBNET_ID or resources.aws.subnet_ids.")
        vpc_id = resource_id(vpcs[0], "VpcId", f"DescribeVpcs in {region}")
        subnets = entries(self._call("ec2", region, "describe_subnets", Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "default-for-az", "Values": ["true"]}]), "Subnets", where)
        offered = {text(o.get("Location")) for o in entries(self._call(
            "ec2", region, "describe_instance_type_offerings", LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [instance_type]}]),
            "InstanceTypeOfferings", f"DescribeInstanceTypeOfferings in {region}")}
        usable = sorted((s for s in subnets if text(s.get("AvailabilityZone")) in offered - {""}),
                        key=lambda s: s["AvailabilityZone"])
        if not usable:
            failures.append(f"{region}: {instance_type} is not offered in any zone")
            raise SkipRegion("not offered")
        return [resource_id(s, "SubnetId", where) for s in usable], vpc_id

    def _ensure_key(self, region: str, spec: LaunchSpec, opts: Options,
                    created: dict[str, str]) -> str:
        if opts.get("key_name"):
            return str(opts.get("key_name"))
        if not spec.ssh_public_key:
            raise ConfigError("the launch spec has no SSH public key and resources.aws.key_name is not set.")
        from botocore.exceptions import ClientError

        name = resource_name(spec.run_id)
        try:
            self._call_raw("ec2", region, "import_key_pair", KeyName=name,
                           PublicKeyMaterial=spec.ssh_public_key.encode(),
                           TagSpecifications=[{"ResourceType": "key-pair",
                                               "Tags": to_tags(self._labels(spec, opts))}])
        except ClientError as exc:
            if error_code(exc) != "InvalidKeyPair.Duplicate":
                raise to_ephemera_error(exc, "ImportKeyPair", region) from exc
        created["key_name"] = name
        return name

    def _ensure_group(self, region: str, spec: LaunchSpec, opts: Options, vpc_id: str | None,
                      created: dict[str, str]) -> str:
        existing = opts.get("security_group_id") or self.settings.aws_security_group_id
        if existing:
            return str(existing)
        cidr = ssh_cidr(opts.get("ssh_cidr") or self.settings.aws_ssh_cidr,
                        "resources.aws.ssh_cidr / EPHEMERA_AWS_SSH_CIDR")
        from botocore.exceptions import ClientError

        name = resource_name(spec.run_id)
        params: dict[str, Any] = {
            "GroupName": name,
            "Description": f"ephemera run {spec.run_id}: SSH from {cidr} only",
            "TagSpecifications": [{"ResourceType": "security-group",
                                   "Tags": to_tags(self._labels(spec, opts), name)}],
        }
        if vpc_id:
            params["VpcId"] = vpc_id
        try:
            group_id = resource_id(self._call_raw("ec2", region, "create_security_group", **params),
                                   "GroupId", f"CreateSecurityGroup in {region}")
        except ClientError as exc:
            if error_code(exc) != "InvalidGroup.Duplicate":
                raise to_ephemera_error(exc, "CreateSecurityGroup", region) from exc
            filters = [{"Name": "group-name", "Values": [name]}]
            if vpc_id:
                filters.append({"Name": "vpc-id", "Values": [vpc_id]})
            where = f"DescribeSecurityGroups in {region}"
            groups = entries(self._call("ec2", region, "describe_security_groups",
                                        Filters=filters), "SecurityGroups", where)
            group_id = resource_id(groups[0] if groups else {}, "GroupId", where)
        created["security_group_id"] = group_id
        try:
            self._call_raw("ec2", region, "authorize_security_group_ingress", GroupId=group_id,
                           IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                           "IpRanges": [{"CidrIp": cidr, "Description": "ephemera SSH"}]}])
        except ClientError as exc:
            if error_code(exc) != "InvalidPermission.Duplicate":
                raise to_ephemera_error(exc, "AuthorizeSecurityGroupIngress", region) from exc
        return group_id

    def _delete_created(self, region: str, created: Mapping[str, str]) -> None:
        """Remove the group and key made for an attempt that did not launch anything."""
        if created.get("security_group_id"):
            self._delete_group(region, created["security_group_id"])
        if created.get("key_name"):
            self._delete_key(region, created["key_name"])

    def _delete_group(self, region: str, group_id: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call_raw("ec2", region, "delete_security_group", GroupId=group_id)
        except ClientError as exc:
            code = error_code(exc)
            if code == "DependencyViolation":
                return False
            if classify(exc) is not Kind.NOT_FOUND:
                raise to_ephemera_error(exc, "DeleteSecurityGroup", region) from exc
        return True

    def _delete_key(self, region: str, key_name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call_raw("ec2", region, "delete_key_pair", KeyName=key_name)
        except ClientError as exc:
            if classify(exc) is not Kind.NOT_FOUND:
                raise to_ephemera_error(exc, "DeleteKeyPair", region) from exc
        return True
