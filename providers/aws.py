"""The ``aws`` provider: one EC2 GPU instance per run, always torn down.

What a launch creates, all tagged with the ephemera labels (``ephemera:run-id``,
``ephemera:job``, ``ephemera:owner``, ``ephemera:expires-at``) plus the user's tags:

- a key pair ``ephemera-<run-id>`` imported from the run's fresh ed25519 key,
- a security group ``ephemera-<run-id>`` that lets in SSH from one CIDR and nothing
  else (vLLM is reached through the SSH tunnel, never exposed),
- the instance: a GPU VM image with the NVIDIA driver, Docker and the container
  toolkit (AWS's Deep Learning Base GPU AMI by default), IMDSv2 required, an
  encrypted gp3 root volume, ``InstanceInitiatedShutdownBehavior=terminate`` and a
  user-data dead-man switch that powers off at ``expires-at``.

The provider never waits: ``launch`` returns as soon as RunInstances has answered,
``poll`` says how far the instance has come, ``terminate`` asks for termination, and
``terminate_confirmed`` (called by the controller until it returns True) checks that
the instance is ``terminated`` and then deletes the group and key pair. The one
exception is throttling and 5xx answers: a single API call is retried with
exponential backoff and jitter (tenacity), bounded by ``retry_attempts``.

Capacity failover happens inside ``launch``: each RunInstances attempt is immediate,
and a capacity error moves on to the next subnet (availability zone), then from spot
to on-demand when allowed, then to the next region; when all are exhausted,
``NoCapacityError`` lets the controller try the plan's next offer. A quota error
skips that instance family in that region for the rest of this provider's life.

Options read from ``LaunchSpec.options`` (the job's ``resources.aws`` section under
``"aws"``, or the same keys at the top level): ``ami``, ``subnet_ids``,
``security_group_id``, ``ssh_cidr``, ``key_name``, ``ssh_user``, plus ``spot``,
``spot_fallback``, ``regions`` and ``tags``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from ephemera_providers.aws_errors import (
    QUOTA_CODES,
    Kind,
    classify,
    error_code,
    error_text,
    to_ephemera_error,
)
from ephemera_providers.aws_userdata import user_data

from ephemera.errors import ConfigError, InfraError, NoCapacityError, QuotaError
from ephemera.provider import (
    LABEL_KEYS,
    LABEL_RUN_ID,
    Endpoint,
    Instance,
    InstanceState,
    LaunchSpec,
    Offer,
    OfferRequest,
)

DLAMI_PARAMETER = (
    "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)
TAG_PREFIX = "ephemera:"
# Room for the job's image and the model weights when the plan does not say.
DEFAULT_DATA_GIB = 60
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
# A new instance can be missing from DescribeInstances for a moment after launch.
NOT_FOUND_GRACE_SECONDS = 120
SSH_PROBE_SECONDS = 2.0

_STATE_MAP = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "stopping": InstanceState.TERMINATING,
    "shutting-down": InstanceState.TERMINATING,
    "stopped": InstanceState.FAILED,
    "terminated": InstanceState.TERMINATED,
}


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


def resource_name(run_id: str) -> str:
    return f"ephemera-{run_id}"


def ssh_cidr(configured: str | None, field: str) -> str:
    """The CIDR allowed to reach SSH: the configured one, else this machine's public /32.

    The lookup asks https://checkip.amazonaws.com (AWS's own echo service); it is
    only used when no CIDR is configured, so tests and locked-down runners never
    leave the machine for it.
    """
    if configured:
        try:
            return str(ipaddress.ip_network(configured, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{field}: '{configured}' is not a CIDR ({exc}).") from None
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


class _SkipRegion(Exception):
    """Internal: stop trying this region (quota, no subnet), go on with the next one."""


class AWSProvider:
    """EC2 instances through boto3 (imported lazily; the credentials chain is AWS's own)."""

    name: ClassVar[str] = "aws"
    # The controller makes a fresh ed25519 key per run; launch imports it as the key pair.
    needs_ssh_key: ClassVar[bool] = True

    def __init__(self, settings: Any = None, *, session: Any = None, retry_attempts: int = 6,
                 retry_base_seconds: float = 0.5, retry_max_seconds: float = 20.0) -> None:
        if settings is None:
            from ephemera.settings import get_settings

            settings = get_settings()
        self.settings = settings
        self._session = session
        self._clients: dict[tuple[str, str], Any] = {}
        self.retry_attempts = retry_attempts
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        # (region, instance family) -> why it is skipped (a quota error seen this run).
        self.skipped_families: dict[tuple[str, str], str] = {}

    # ----------------------------------------------------------------- plumbing

    @classmethod
    def check(cls) -> tuple[bool, str]:
        """For ``ephemera providers``: is boto3 importable and are credentials found?"""
        try:
            import boto3
        except ImportError:
            return False, "boto3 is not installed: pip install 'ephemera[aws]'"
        session = boto3.session.Session()
        creds = session.get_credentials()
        region = session.region_name or "none (set AWS_REGION or EPHEMERA_AWS_REGION)"
        if creds is None:
            return False, (f"boto3 {boto3.__version__}; no AWS credentials found "
                           "(environment, AWS_PROFILE, ~/.aws, SSO or instance role)")
        return True, f"boto3 {boto3.__version__}; credentials from {creds.method}; region {region}"

    @property
    def session(self) -> Any:
        if self._session is None:
            import boto3

            self._session = boto3.session.Session(region_name=self.settings.aws_region)
        return self._session

    def default_region(self) -> str:
        return self.settings.aws_region or self.session.region_name or "us-east-1"

    def client(self, service: str, region: str) -> Any:
        """One cached client per service and region. botocore's own retries are off:
        ``_call`` retries with tenacity so that the policy is in one place."""
        key = (service, region)
        if key not in self._clients:
            from botocore.config import Config

            config = Config(retries={"total_max_attempts": 1}, connect_timeout=10,
                            read_timeout=60, user_agent_extra="ephemera")
            self._clients[key] = self.session.client(service, region_name=region, config=config)
        return self._clients[key]

    def _call_raw(self, service: str, region: str, operation: str, **params: Any) -> Any:
        """One API call, retried on throttling/5xx/connection errors with exponential
        backoff and jitter. Other errors are raised as botocore raised them."""
        from botocore.exceptions import BotoCoreError, ClientError
        from tenacity import (
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            wait_random_exponential,
        )

        client = self.client(service, region)

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, ClientError | BotoCoreError) and classify(exc) is Kind.TRANSIENT

        for attempt in Retrying(
            retry=retry_if_exception(transient),
            stop=stop_after_attempt(max(1, self.retry_attempts)),
            wait=wait_random_exponential(multiplier=self.retry_base_seconds,
                                         max=self.retry_max_seconds),
            reraise=True,
        ):
            with attempt:
                return getattr(client, operation)(**params)
        raise AssertionError("unreachable")  # pragma: no cover

    def _call(self, service: str, region: str, operation: str, **params: Any) -> Any:
        """``_call_raw`` with every AWS failure turned into a typed ephemera error."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._call_raw(service, region, operation, **params)
        except (ClientError, BotoCoreError) as exc:
            raise to_ephemera_error(exc, operation, region) from exc

    # ------------------------------------------------------------------ offers

    def offers(self, request: OfferRequest) -> list[Offer]:
        """The built-in price catalog, replaced by ``ephemera catalog refresh aws``'s
        cache when there is one."""
        from ephemera import catalog

        return list(catalog.builtin_aws_offers(request))

    # ------------------------------------------------------------------ launch

    def launch(self, spec: LaunchSpec) -> Instance:
        opts = _Options(spec.options)
        regions = self._launch_regions(spec, opts)
        existing = self._existing_instance(spec.run_id, regions)
        if existing is not None:
            return existing
        family = spec.offer.instance_type.split(".")[0]
        failures: list[str] = []
        quota_hints: list[str] = []
        for region in regions:
            skipped = self.skipped_families.get((region, family))
            if skipped:
                failures.append(f"{region}: {family} skipped ({skipped})")
                continue
            created: dict[str, str] = {}
            try:
                instance = self._launch_in_region(spec, opts, region, created, failures)
            except _SkipRegion as why:
                self._delete_created(region, created)
                if str(why).startswith("quota:"):
                    quota_hints.append(str(why)[len("quota:"):])
                continue
            except BaseException:
                self._delete_created(region, created)
                raise
            if instance is not None:
                return instance
            self._delete_created(region, created)
        where = ", ".join(regions)
        detail = "; ".join(failures) or "nothing was tried"
        if quota_hints and len(quota_hints) == len(failures):
            raise QuotaError(
                f"{spec.offer.instance_type} could not be launched in {where}: {detail}.",
                hint="Raise " + "; ".join(dict.fromkeys(quota_hints)) + ".")
        raise NoCapacityError(
            f"no capacity for {spec.offer.instance_type} in {where}: {detail}.",
            hint=("Add regions (resources.regions / EPHEMERA_AWS_REGIONS) or allow other "
                  "instance types; ephemera tries the plan's next offer."))

    def _launch_regions(self, spec: LaunchSpec, opts: _Options) -> list[str]:
        listed = list(opts.get("regions") or []) or list(self.settings.aws_regions)
        if listed:
            first = [spec.offer.region] if spec.offer.region in listed else []
            return list(dict.fromkeys(first + listed))
        return [spec.offer.region or self.default_region()]

    def _existing_instance(self, run_id: str, regions: list[str]) -> Instance | None:
        """Launch is idempotent on the run id: a live instance tagged with it is reused."""
        for region in regions:
            for raw in self._describe(region, [
                {"Name": f"tag:{tag_key(LABEL_RUN_ID)}", "Values": [run_id]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
            ]):
                return self._instance_from(raw, region, data=_data_from_instance(raw, region))
        return None

    def _launch_in_region(self, spec: LaunchSpec, opts: _Options, region: str,
                          created: dict[str, str], failures: list[str]) -> Instance | None:
        ami = self._resolve_ami(region, opts)
        root_device, image_gib = self._image_root(region, ami)
        subnets, vpc_id = self._subnets(region, spec.offer.instance_type, opts, failures)
        key_name = self._ensure_key(region, spec, opts, created)
        group_id = self._ensure_group(region, spec, opts, vpc_id, created)
        disk_gib = image_gib + (spec.disk_gib or DEFAULT_DATA_GIB)
        spot = bool(spec.offer.spot or opts.get("spot"))
        markets = ["spot", "on-demand"] if spot and opts.get("spot_fallback", True) else (
            ["spot"] if spot else ["on-demand"])
        labels = self._labels(spec, opts)
        for market in markets:
            for subnet in subnets:
                params = self._run_params(spec, ami, root_device, disk_gib, key_name, group_id,
                                          subnet, market, labels, region)
                try:
                    reply = self._call_raw("ec2", region, "run_instances", **params)
                except Exception as exc:  # noqa: BLE001 - sorted by classify below
                    kind = classify(exc) if hasattr(exc, "response") else Kind.OTHER
                    place = f"{region}/{subnet or 'default subnet'} ({market})"
                    if kind is Kind.CAPACITY:
                        failures.append(f"{place}: {error_code(exc)}")
                        continue
                    if kind is Kind.QUOTA:
                        code = error_code(exc)
                        failures.append(f"{place}: {code}: {error_text(exc)}")
                        if market == "spot" and len(markets) > 1:
                            break  # spot quota: on-demand may still be allowed
                        family = spec.offer.instance_type.split(".")[0]
                        self.skipped_families[(region, family)] = code
                        raise _SkipRegion(f"quota:{QUOTA_CODES.get(code, code)} in {region}") from exc
                    if hasattr(exc, "response") or _is_boto_error(exc):
                        raise to_ephemera_error(exc, "RunInstances", region) from exc
                    raise
                raw = reply["Instances"][0]
                data = {
                    "region": region,
                    "ami": ami,
                    "subnet_id": subnet or "",
                    "market": market,
                    "key_name": key_name,
                    "key_owned": "1" if created.get("key_name") else "",
                    "security_group_id": group_id,
                    "group_owned": "1" if created.get("security_group_id") else "",
                    "ssh_user": str(opts.get("ssh_user") or "ubuntu"),
                    "key_path": spec.ssh_private_key_path or "",
                    "disk_gib": str(disk_gib),
                }
                return self._instance_from(raw, region, data=data, labels=labels)
        return None

    def _labels(self, spec: LaunchSpec, opts: _Options) -> dict[str, str]:
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

    def _run_params(self, spec: LaunchSpec, ami: str, root_device: str, disk_gib: int,
                    key_name: str, group_id: str, subnet: str | None, market: str,
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
            "UserData": user_data(spec.run_id, spec.expires_at),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                "HttpPutResponseHopLimit": 1},
            "BlockDeviceMappings": [{"DeviceName": root_device, "Ebs": {
                "VolumeSize": disk_gib, "VolumeType": "gp3", "DeleteOnTermination": True,
                "Encrypted": True}}],
            "TagSpecifications": specs,
            # Same token for the same attempt: a retried call cannot start a second machine.
            "ClientToken": f"{spec.run_id}-{region}-{subnet or 'any'}-{market}"[-64:],
        }
        if subnet and self.settings.aws_use_private_ip:
            # No public address at all: reached by private address or through the bastion.
            params["NetworkInterfaces"] = [{
                "DeviceIndex": 0, "SubnetId": subnet, "Groups": [group_id],
                "AssociatePublicIpAddress": False, "DeleteOnTermination": True}]
        else:
            params["SecurityGroupIds"] = [group_id]
            if subnet:
                params["SubnetId"] = subnet
        if market == "spot":
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        return params

    def _resolve_ami(self, region: str, opts: _Options) -> str:
        ami = opts.get("ami") or self.settings.aws_ami
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
        return reply["Parameter"]["Value"]

    def _image_root(self, region: str, ami: str) -> tuple[str, int]:
        """Root device name and the size of its snapshot (the disk must be at least that)."""
        from botocore.exceptions import ClientError

        try:
            images = self._call_raw("ec2", region, "describe_images", ImageIds=[ami])["Images"]
        except ClientError as exc:
            if classify(exc) in (Kind.INVALID, Kind.NOT_FOUND):
                images = []
            else:
                raise to_ephemera_error(exc, "DescribeImages", region) from exc
        if not images:
            raise ConfigError(f"AMI {ami} does not exist in {region} (EPHEMERA_AWS_AMI / resources.aws.ami).")
        image = images[0]
        root = image.get("RootDeviceName") or "/dev/sda1"
        size = 0
        for mapping in image.get("BlockDeviceMappings", []):
            if mapping.get("DeviceName") == root:
                size = int(mapping.get("Ebs", {}).get("VolumeSize") or 0)
        return root, size

    def _subnets(self, region: str, instance_type: str, opts: _Options,
                 failures: list[str]) -> tuple[list[str | None], str | None]:
        """Subnets to try in order, and their VPC. Configured subnets are used as given;
        otherwise the default VPC's default subnets in zones that offer the type."""
        wanted = list(opts.get("subnet_ids") or [])
        if not wanted and self.settings.aws_subnet_id:
            wanted = [self.settings.aws_subnet_id]
        if wanted:
            found = self._call("ec2", region, "describe_subnets",
                               Filters=[{"Name": "subnet-id", "Values": wanted}])["Subnets"]
            by_id = {s["SubnetId"]: s for s in found}
            subnets = [s for s in wanted if s in by_id]
            if not subnets:
                failures.append(f"{region}: none of the subnets {', '.join(wanted)} is in this region")
                raise _SkipRegion("subnets")
            return list(subnets), by_id[subnets[0]]["VpcId"]
        vpcs = self._call("ec2", region, "describe_vpcs",
                          Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ConfigError(
                f"{region} has no default VPC, so ephemera does not know where to launch.",
                hint="Set EPHEMERA_AWS_SUBNET_ID or resources.aws.subnet_ids.")
        vpc_id = vpcs[0]["VpcId"]
        subnets = self._call("ec2", region, "describe_subnets", Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        offered = {o["Location"] for o in self._call(
            "ec2", region, "describe_instance_type_offerings", LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": [instance_type]}])["InstanceTypeOfferings"]}
        usable = sorted((s for s in subnets if s["AvailabilityZone"] in offered),
                        key=lambda s: s["AvailabilityZone"])
        if not usable:
            failures.append(f"{region}: {instance_type} is not offered in any zone")
            raise _SkipRegion("not offered")
        return [s["SubnetId"] for s in usable], vpc_id

    def _ensure_key(self, region: str, spec: LaunchSpec, opts: _Options,
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

    def _ensure_group(self, region: str, spec: LaunchSpec, opts: _Options, vpc_id: str | None,
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
            group_id = self._call_raw("ec2", region, "create_security_group", **params)["GroupId"]
        except ClientError as exc:
            if error_code(exc) != "InvalidGroup.Duplicate":
                raise to_ephemera_error(exc, "CreateSecurityGroup", region) from exc
            filters = [{"Name": "group-name", "Values": [name]}]
            if vpc_id:
                filters.append({"Name": "vpc-id", "Values": [vpc_id]})
            group_id = self._call("ec2", region, "describe_security_groups",
                                  Filters=filters)["SecurityGroups"][0]["GroupId"]
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

    # -------------------------------------------------------------------- poll

    def poll(self, instance: Instance) -> Instance:
        region = instance.region or instance.data.get("region") or self.default_region()
        if instance.data.get("kind"):
            return self._poll_orphan(instance, region)
        raw = self._describe_one(region, instance.id)
        if raw is None:
            launched = instance.launched_at
            if launched and (datetime.now(UTC) - launched).total_seconds() < NOT_FOUND_GRACE_SECONDS:
                return instance.evolve(state=InstanceState.PENDING, message="not visible to the API yet")
            return self._after_termination(instance, "instance no longer exists")
        state = raw["State"]["Name"]
        reason = (raw.get("StateReason") or {}).get("Message", "")
        if state == "terminated":
            return self._after_termination(instance, reason or "terminated")
        mapped = _STATE_MAP.get(state, InstanceState.PENDING)
        if mapped is not InstanceState.RUNNING:
            return instance.evolve(state=mapped, message=reason or state)
        endpoint = self._endpoint(raw, instance)
        if endpoint is None:
            return instance.evolve(state=InstanceState.RUNNING, message="running, no address yet")
        if not endpoint.proxy_jump and not _ssh_answers(endpoint.host, endpoint.port):
            return instance.evolve(state=InstanceState.RUNNING,
                                   message=f"running, SSH on {endpoint.host}:{endpoint.port} not answering yet")
        workroot = getattr(self.settings, "ssh_workroot", "/tmp/ephemera")
        return instance.evolve(state=InstanceState.READY, endpoint=endpoint,
                               workdir=f"{workroot}/{instance.run_id}", message="ready")

    def _poll_orphan(self, item: Instance, region: str) -> Instance:
        """A left-over group or key pair (from ``find``): TERMINATED once it is deleted."""
        from botocore.exceptions import ClientError

        kind = item.data["kind"]
        try:
            if kind == "security-group":
                self._call_raw("ec2", region, "describe_security_groups", GroupIds=[item.id])
            else:
                self._call_raw("ec2", region, "describe_key_pairs", KeyNames=[item.id])
        except ClientError as exc:
            if classify(exc) is Kind.NOT_FOUND:
                return item.evolve(state=InstanceState.TERMINATED, message=f"{kind} deleted")
            raise to_ephemera_error(exc, f"Describe {kind}", region) from exc
        return item

    def _endpoint(self, raw: Mapping[str, Any], instance: Instance) -> Endpoint | None:
        """Where SSH reaches the instance: the override (bastion forward, tests), the
        private address when asked (or when only that exists behind a bastion), else
        the public address."""
        bastion = self.settings.aws_bastion
        host, port = None, 22
        override = self.settings.aws_ssh_host_override
        if override:
            host, _, port_text = override.rpartition(":") if ":" in override else (override, "", "")
            if not host:
                host, port_text = override, ""
            port = int(port_text) if port_text else 22
        elif self.settings.aws_use_private_ip:
            host = raw.get("PrivateIpAddress")
        else:
            host = raw.get("PublicIpAddress") or (raw.get("PrivateIpAddress") if bastion else None)
        if not host:
            return None
        return Endpoint(host=host, port=port, user=instance.data.get("ssh_user") or "ubuntu",
                        key_path=instance.data.get("key_path") or None, proxy_jump=bastion)

    # --------------------------------------------------------------- terminate

    def terminate(self, instance: Instance) -> None:
        """Ask for termination and return (no waiting). Already gone is a success. The
        group and key pair are deleted at once when the instance is already
        terminated, else by ``terminate_confirmed``."""
        region = instance.region or instance.data.get("region") or self.default_region()
        kind = instance.data.get("kind")
        if kind == "security-group":
            self._delete_group(region, instance.id)
            return
        if kind == "key-pair":
            self._delete_key(region, instance.id)
            return
        from botocore.exceptions import ClientError

        try:
            self._call_raw("ec2", region, "terminate_instances", InstanceIds=[instance.id])
        except ClientError as exc:
            if classify(exc) is not Kind.NOT_FOUND:
                raise to_ephemera_error(exc, "TerminateInstances", region) from exc
        self.terminate_confirmed(instance)

    def terminate_confirmed(self, instance: Instance) -> bool:
        """True once the instance is ``terminated`` (or unknown to AWS) and the group and
        key pair made for it are gone. One look, no waiting: call it again until True."""
        return self.poll(instance.evolve(launched_at=None)).state is InstanceState.TERMINATED

    def cleanup(self, instance: Instance) -> bool:
        """Delete the run's security group and key pair; False while the group is still
        held by the instance's network interface (try again later)."""
        region = instance.region or instance.data.get("region") or self.default_region()
        done = True
        if instance.data.get("group_owned") and instance.data.get("security_group_id"):
            done = self._delete_group(region, instance.data["security_group_id"])
        if instance.data.get("key_owned") and instance.data.get("key_name"):
            done = self._delete_key(region, instance.data["key_name"]) and done
        return done

    def _after_termination(self, instance: Instance, reason: str) -> Instance:
        if self.cleanup(instance):
            return instance.evolve(state=InstanceState.TERMINATED, endpoint=None, message=reason)
        return instance.evolve(state=InstanceState.TERMINATING,
                               message=f"{reason}; security group still in use, retrying")

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

    # --------------------------------------------------------------- find/reap

    def find_regions(self) -> list[str]:
        return list(dict.fromkeys(self.settings.aws_regions or [self.default_region()]))

    def find(self, labels: Mapping[str, str], regions: Iterable[str] | None = None) -> list[Instance]:
        """Live instances carrying all ``labels``, plus security groups and key pairs
        tagged by ephemera that no live instance uses any more (state FAILED, with
        ``data["kind"]`` saying which), across the configured regions. The reaper and
        teardown treat those like instances: ``terminate`` deletes them and ``poll``
        says TERMINATED once they are gone. Only resources carrying the
        ``ephemera:run-id`` tag are ever returned."""
        filters = [{"Name": "tag-key", "Values": [tag_key(LABEL_RUN_ID)]}]
        filters += [{"Name": f"tag:{tag_key(k)}", "Values": [str(v)]} for k, v in labels.items()]
        found: list[Instance] = []
        for region in list(regions or self.find_regions()):
            for raw in self._describe(region, filters + [
                    {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]):
                found.append(self._instance_from(raw, region, data=_data_from_instance(raw, region)))
            groups = self._call("ec2", region, "describe_security_groups",
                                Filters=filters)["SecurityGroups"]
            for group in groups:
                if not self._describe(region, [
                        {"Name": "instance.group-id", "Values": [group["GroupId"]]},
                        {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]):
                    found.append(_orphan("security-group", group["GroupId"], region,
                                         from_tags(group.get("Tags"))))
            for key in self._call("ec2", region, "describe_key_pairs", Filters=filters)["KeyPairs"]:
                if not self._describe(region, [
                        {"Name": "key-name", "Values": [key["KeyName"]]},
                        {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]):
                    found.append(_orphan("key-pair", key["KeyName"], region,
                                         from_tags(key.get("Tags"))))
        return found

    # ----------------------------------------------------------------- connect

    def connect(self, instance: Instance):
        """SSH to the instance (through the bastion when set); the job's image then runs
        through the VM's Docker with ``--gpus all``, as on every provider."""
        from ephemera import ssh

        if instance.endpoint is None:
            raise InfraError(f"instance {instance.id} has no address yet (state {instance.state}).")
        return ssh.SSHRemote.from_endpoint(instance.endpoint)

    # ----------------------------------------------------------------- helpers

    def _describe(self, region: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Filters": filters}
            if token:
                params["NextToken"] = token
            reply = self._call("ec2", region, "describe_instances", **params)
            for reservation in reply.get("Reservations", []):
                out.extend(reservation.get("Instances", []))
            token = reply.get("NextToken")
            if not token:
                return out

    def _describe_one(self, region: str, instance_id: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            reply = self._call_raw("ec2", region, "describe_instances", InstanceIds=[instance_id])
        except ClientError as exc:
            if classify(exc) is Kind.NOT_FOUND:
                return None
            raise to_ephemera_error(exc, "DescribeInstances", region) from exc
        for reservation in reply.get("Reservations", []):
            for raw in reservation.get("Instances", []):
                return raw
        return None

    def _instance_from(self, raw: Mapping[str, Any], region: str, *, data: Mapping[str, str],
                       labels: Mapping[str, str] | None = None) -> Instance:
        tags = from_tags(raw.get("Tags"))
        merged = dict(labels or tags)
        launched = raw.get("LaunchTime")
        if isinstance(launched, datetime) and launched.tzinfo is None:
            launched = launched.replace(tzinfo=UTC)
        # Only poll() says READY; until then a running instance is still on its way.
        state = _STATE_MAP.get(raw.get("State", {}).get("Name", "pending"), InstanceState.PENDING)
        return Instance(
            provider=self.name,
            id=raw["InstanceId"],
            run_id=merged.get(LABEL_RUN_ID, ""),
            state=state,
            labels=merged,
            instance_type=raw.get("InstanceType", ""),
            region=region,
            launched_at=launched if isinstance(launched, datetime) else datetime.now(UTC),
            message=raw.get("State", {}).get("Name", ""),
            data=dict(data),
        )


class _Options:
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


def _data_from_instance(raw: Mapping[str, Any], region: str) -> dict[str, str]:
    """What terminate needs, rebuilt from AWS's own description (reaper, re-launch)."""
    labels = from_tags(raw.get("Tags"))
    name = resource_name(labels.get(LABEL_RUN_ID, ""))
    attached = list(raw.get("SecurityGroups", []))
    for interface in raw.get("NetworkInterfaces", []):
        attached += interface.get("Groups", [])
    groups = [g["GroupId"] for g in attached if g.get("GroupName") == name]
    return {
        "region": region,
        "key_name": raw.get("KeyName", ""),
        "key_owned": "1" if raw.get("KeyName") == name else "",
        "security_group_id": groups[0] if groups else "",
        "group_owned": "1" if groups else "",
        "market": "spot" if raw.get("InstanceLifecycle") == "spot" else "on-demand",
        "ssh_user": "ubuntu",
    }


def _orphan(kind: str, ident: str, region: str, labels: Mapping[str, str]) -> Instance:
    return Instance(provider="aws", id=ident, run_id=labels.get(LABEL_RUN_ID, ""),
                    state=InstanceState.FAILED, labels=dict(labels), region=region,
                    message=f"orphaned {kind} (no live instance uses it)",
                    data={"kind": kind, "region": region})


def _is_boto_error(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError

    return isinstance(exc, BotoCoreError)


def _ssh_answers(host: str, port: int) -> bool:
    """A quick, bounded look for an SSH banner (so READY means SSH can be tried)."""
    try:
        with socket.create_connection((host, port), timeout=SSH_PROBE_SECONDS) as sock:
            sock.settimeout(SSH_PROBE_SECONDS)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False

