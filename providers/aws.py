"""The ``aws`` provider: one EC2 GPU instance per run, always torn down.

What a launch creates, all tagged with the ephemera labels (``ephemera:run-id``,
``ephemera:job``, ``ephemera:owner``, ``ephemera:expires-at``) plus the user's tags:

- a key pair ``ephemera-<run-id>`` imported from the run's fresh ed25519 key,
- a security group ``ephemera-<run-id>`` that lets in SSH from one CIDR and nothing
  else (vLLM is reached through the SSH tunnel, never exposed),
- the instance: a GPU VM image with the NVIDIA driver, Docker and the container
  toolkit (AWS's Deep Learning Base GPU AMI by default), IMDSv2 required, an
  encrypted gp3 root volume, a public address asked for on its network interface,
  ``InstanceInitiatedShutdownBehavior=terminate`` and a user-data dead-man switch
  that powers off at ``expires-at``.

The provider never waits: ``launch`` returns as soon as RunInstances has answered,
``poll`` says how far the instance has come, ``terminate`` asks for termination, and
``terminate_confirmed`` (called by the controller until it returns True) checks that
the instance is ``terminated`` and then deletes the group and key pair. A terminate
that AWS answers with "not found" right after launch is not taken as "gone": ``poll``
sends it again while the instance shows up alive. The one exception to "never
waits" is throttling and 5xx answers: a single API call is retried with exponential
backoff and jitter (tenacity), bounded by ``retry_attempts``.

Failover happens inside ``launch``, region by region (the offer's first). Before
anything is created in a region, the region is recorded on disk for the run (see
``aws_regions``; ``aws_find`` searches there), its vCPU quotas are read (see
``aws_quotas``) and the price cap is checked for each market (``aws_failover``). Then each RunInstances attempt is immediate: a capacity
error moves on to the next subnet, then from spot to on-demand when allowed, then to
the next region; a quota error skips that instance family in that region for the
rest of this provider's life; spot without its service-linked role is taken as "no
spot in this account"; ``OptInRequired`` skips the region and
``InvalidParameterCombination`` the offer in that region. When all are exhausted,
``NoCapacityError`` (or ``QuotaError``) lets the controller try the plan's next offer.

Options read from ``LaunchSpec.options`` (the job's ``resources.aws`` section under
``"aws"``, or the same keys at the top level): ``ami``, ``subnet_ids``,
``security_group_id``, ``ssh_cidr``, ``key_name``, ``ssh_user``, plus ``spot``,
``spot_fallback``, ``max_price_per_hour``, ``regions`` and ``tags``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar

from ephemera_providers.aws_bake import Baking
from ephemera_providers.aws_common import (
    TAG_PREFIX,
    bad_answer,
    from_tags,
    instances_of,
    mapping,
    resource_id,
    resource_name,
    shown,
    ssh_cidr,
    state_name,
    tag_key,
    text,
    to_tags,
)
from ephemera_providers.aws_console import ConsoleHostKeys
from ephemera_providers.aws_errors import (
    Kind,
    classify,
    to_ephemera_error,
)
from ephemera_providers.aws_failover import Failover
from ephemera_providers.aws_find import RunSearch
from ephemera_providers.aws_launch import Launching
from ephemera_providers.aws_quotas import QuotaReader, quota_for
from ephemera_providers.aws_resources import DLAMI_PARAMETER, LaunchResources
from ephemera_providers.aws_terminate import Termination

from ephemera.errors import InfraError
from ephemera.provider import (
    LABEL_RUN_ID,
    Capabilities,
    Endpoint,
    Instance,
    InstanceState,
    Offer,
    OfferRequest,
    Runs,
)

__all__ = ["AWSProvider", "DLAMI_PARAMETER", "TAG_PREFIX", "from_tags", "resource_name",
           "ssh_cidr", "tag_key", "to_tags"]

# One API call, retries included, gives up after about CALL_SECONDS plus one read.
CALL_SECONDS = 45.0
READ_TIMEOUT_SECONDS = 30
# A new instance can be missing from DescribeInstances for a moment after launch.
NOT_FOUND_GRACE_SECONDS = 120
SSH_PROBE_SECONDS = 2.0
# The most DescribeInstances pages one search reads (a NextToken that never ends).
MAX_PAGES = 1000

_STATE_MAP = {
    "pending": InstanceState.PENDING,
    "running": InstanceState.RUNNING,
    "stopping": InstanceState.TERMINATING,
    "shutting-down": InstanceState.TERMINATING,
    "stopped": InstanceState.FAILED,
    "terminated": InstanceState.TERMINATED,
}


def _check_config() -> Any:
    """botocore settings for ``ephemera check``: one quick try, never minutes of retries."""
    from botocore.config import Config

    return Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1})


class AWSProvider(Launching, Termination, LaunchResources, Failover, RunSearch, ConsoleHostKeys,
                  Baking):
    """EC2 instances through boto3 (imported lazily; the credentials chain is AWS's own)."""

    name: ClassVar[str] = "aws"

    @classmethod
    def capabilities(cls, options: Mapping[str, Any]) -> Capabilities:
        """A VM of the run's own: the job's image through its Docker on the host network,
        a fresh SSH key per run (imported as the key pair), per-second billing with a
        one-minute minimum, and work its user-data starts at boot (``aws_boot_dir``)."""
        from ephemera.spec.settings import get_settings

        return Capabilities(runs=Runs.MACHINE, needs_ssh_key=True, container_network="host",
                            min_billed_seconds=60, boot_dir=get_settings().aws_boot_dir)

    def __init__(self, settings: Any = None, *, session: Any = None, retry_attempts: int = 6,
                 retry_base_seconds: float = 0.5, retry_max_seconds: float = 20.0,
                 call_seconds: float = CALL_SECONDS) -> None:
        if settings is None:
            from ephemera.spec.settings import get_settings

            settings = get_settings()
        self.settings = settings
        self._session = session
        self._clients: dict[tuple[str, str], Any] = {}
        self.retry_attempts = retry_attempts
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self.call_seconds = call_seconds
        # (region, instance family) -> why it is skipped (a quota error seen this run).
        self.skipped_families: dict[tuple[str, str], str] = {}
        # Why spot cannot be used in this account, once RunInstances said so.
        self.spot_unavailable: str | None = None
        self.quotas = QuotaReader(lambda region: self.client("service-quotas", region))
        # Instance id -> TerminateInstances calls sent by this process.
        self._terminate_sent: dict[str, int] = {}

    # ----------------------------------------------------------------- plumbing

    @classmethod
    def check(cls) -> tuple[bool, str]:
        """For ``ephemera providers``: is boto3 importable and are credentials found?"""
        try:
            import boto3
        except ImportError:
            return False, "boto3 is not installed: pip install 'ephemera-gpu[aws]'"
        session = boto3.session.Session()
        creds = session.get_credentials()
        region = session.region_name or "none (set AWS_REGION or EPHEMERA_AWS_REGION)"
        if creds is None:
            return False, (f"boto3 {boto3.__version__}; no AWS credentials found "
                           "(environment, AWS_PROFILE, ~/.aws, SSO or instance role)")
        try:
            sts = session.client("sts", config=_check_config())
            account = sts.get_caller_identity().get("Account", "?")
        except Exception as exc:  # noqa: BLE001 - any refusal is the answer
            return False, (f"boto3 {boto3.__version__}; credentials from {creds.method} were "
                           f"refused: {type(exc).__name__}: {exc}")
        return True, (f"boto3 {boto3.__version__}; account {account}, credentials from "
                      f"{creds.method}; region {region}")

    @classmethod
    def check_details(cls, client: Any = None) -> list[str]:
        """For ``ephemera check``: the on-demand and spot vCPU quotas (Service Quotas) of
        the GPU families in the catalog, in the default region, one line each."""
        from ephemera.sizing.catalog import builtin_aws_catalog

        provider = cls()
        region = provider.default_region()
        if client is None:
            client = provider.session.client("service-quotas", region_name=region,
                                              config=_check_config())
        reader = QuotaReader(lambda _region: client)
        families: dict[tuple[str, str], set[str]] = {}
        for offer in builtin_aws_catalog():
            for market in ("on-demand", "spot"):
                quota = quota_for(offer.instance_type, market)
                if quota:
                    families.setdefault(quota, set()).add(offer.instance_type.split(".")[0])
        lines = []
        for (code, name), found in sorted(families.items()):
            value = reader.value(region, code)
            shown = "unreadable" if value is None else f"{value:g} vCPUs"
            lines.append(f"{region} {code} {name} ({', '.join(sorted(found))}): {shown}")
        return lines

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
                            read_timeout=READ_TIMEOUT_SECONDS, user_agent_extra="ephemera")
            self._clients[key] = self.session.client(service, region_name=region, config=config)
        return self._clients[key]

    def _call_raw(self, service: str, region: str, operation: str, **params: Any) -> Any:
        """One API call, retried on throttling/5xx/connection errors with exponential
        backoff and jitter, for at most ``call_seconds`` in all (no call may hold a
        teardown or a deadline for minutes). Other errors are raised as botocore raised
        them."""
        from botocore.exceptions import BotoCoreError, ClientError
        from tenacity import (
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            stop_after_delay,
            wait_random_exponential,
        )

        client = self.client(service, region)

        def transient(exc: BaseException) -> bool:
            return isinstance(exc, ClientError | BotoCoreError) and classify(exc) is Kind.TRANSIENT

        for attempt in Retrying(
            retry=retry_if_exception(transient),
            stop=stop_after_attempt(max(1, self.retry_attempts)) | stop_after_delay(self.call_seconds),
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
        from ephemera.sizing import catalog

        return list(catalog.builtin_aws_offers(request))

    # ------------------------------------------------------------------ launch

    def _region_of(self, instance: Instance) -> str:
        return instance.region or instance.data.get("region") or self.default_region()

    def poll(self, instance: Instance) -> Instance:
        region = self._region_of(instance)
        if instance.data.get("kind"):
            return self._poll_orphan(instance, region)
        raw = self._describe_one(region, instance.id)
        if raw is None:
            launched = instance.launched_at
            if launched and (datetime.now(UTC) - launched).total_seconds() < NOT_FOUND_GRACE_SECONDS:
                return instance.evolve(state=InstanceState.PENDING, message="not visible to the API yet")
            return self._after_termination(instance, "instance no longer exists")
        state = shown(state_name(raw))
        reason = shown(text(mapping(raw.get("StateReason")).get("Message")))
        if state == "terminated":
            return self._after_termination(instance, reason or "terminated")
        if instance.id in self._terminate_sent and state in ("pending", "running", "stopping", "stopped"):
            return self._terminate_again(instance, region, state)
        mapped = _STATE_MAP.get(state, InstanceState.PENDING)
        if mapped is not InstanceState.RUNNING:
            message = reason or state
            if mapped is InstanceState.PENDING and instance.data.get("notes"):
                message = f"{message}; {instance.data['notes']}"
            return instance.evolve(state=mapped, message=message)
        endpoint = self._endpoint(raw, instance)
        if endpoint is None:
            if self._needs_public_address():
                return instance.evolve(state=InstanceState.FAILED, message=(
                    f"instance {instance.id} is running without a public IPv4 address (subnet "
                    f"{shown(text(raw.get('SubnetId')) or '?')}), so SSH cannot reach it; a public address "
                    "was asked for, so the subnet or an account policy refused it. Use a public "
                    "subnet, or aws_use_private_ip with aws_bastion."))
            return instance.evolve(state=InstanceState.RUNNING, message="running, no address yet")
        if not endpoint.proxy_jump and not _ssh_answers(endpoint.host, endpoint.port):
            return instance.evolve(state=InstanceState.RUNNING,
                                   message=f"running, SSH on {endpoint.host}:{endpoint.port} not answering yet")
        keys = self._console_host_keys(region, instance.id)
        if keys:
            endpoint = replace(endpoint, host_key="\n".join(keys))
        elif not self._host_key_wait_over(instance):
            return instance.evolve(state=InstanceState.RUNNING, message=(
                "running, waiting for its SSH host keys in the console output"))
        from ephemera_providers.ssh import home_workroot

        workroot = home_workroot(self.settings.ssh_workroot, endpoint.user)
        return instance.evolve(state=InstanceState.READY, endpoint=endpoint,
                               workdir=f"{workroot}/{instance.run_id}", message="ready")

    def _needs_public_address(self) -> bool:
        return not (self.settings.aws_ssh_host_override or self.settings.aws_use_private_ip
                    or self.settings.aws_bastion)

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
            host = _address(raw, "PrivateIpAddress")
        else:
            host = _address(raw, "PublicIpAddress") or (
                _address(raw, "PrivateIpAddress") if bastion else None)
        if not host:
            return None
        return Endpoint(host=host, port=port, user=instance.data.get("ssh_user") or "ubuntu",
                        key_path=instance.data.get("key_path") or None, proxy_jump=bastion)

    # --------------------------------------------------------------- terminate

    def connect(self, instance: Instance):
        """SSH to the instance (through the bastion when set); the job's image then runs
        through the VM's Docker with ``--gpus all``, as on every provider."""
        from ephemera.transport.ssh_remote import SSHRemote

        if instance.endpoint is None:
            raise InfraError(f"instance {instance.id} has no address yet (state {instance.state}).")
        return SSHRemote.from_endpoint(instance.endpoint, run_id=instance.run_id)

    # ----------------------------------------------------------------- helpers

    def _describe(self, region: str, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every instance the filters match, page by page (a page token that repeats or
        pages past MAX_PAGES is an error, not an endless loop)."""
        where = f"DescribeInstances in {region}"
        out: list[dict[str, Any]] = []
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"Filters": filters}
            if token:
                params["NextToken"] = token
            reply = self._call("ec2", region, "describe_instances", **params)
            out.extend(instances_of(reply, where))
            token = reply.get("NextToken")
            if not token:
                return out
            if not isinstance(token, str) or token in seen:
                raise bad_answer(where, "NextToken", token, "a new page token")
            seen.add(token)
        raise InfraError(f"AWS {where} gave more than {MAX_PAGES} pages; stopped reading.")

    def _describe_one(self, region: str, instance_id: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            reply = self._call_raw("ec2", region, "describe_instances", InstanceIds=[instance_id])
        except ClientError as exc:
            if classify(exc) is Kind.NOT_FOUND:
                return None
            raise to_ephemera_error(exc, "DescribeInstances", region) from exc
        for raw in instances_of(reply, f"DescribeInstances in {region}"):
            if raw["InstanceId"] == instance_id:
                return dict(raw)
        return None

    def _instance_from(self, raw: Mapping[str, Any], region: str, *, data: Mapping[str, str],
                       labels: Mapping[str, str] | None = None) -> Instance:
        ident = resource_id(raw, "InstanceId", f"DescribeInstances in {region}")
        tags = from_tags(raw.get("Tags"))
        merged = dict(labels or tags)
        launched = raw.get("LaunchTime")
        if isinstance(launched, datetime) and launched.tzinfo is None:
            launched = launched.replace(tzinfo=UTC)
        # Only poll() says READY; until then a running instance is still on its way.
        state = _STATE_MAP.get(state_name(raw), InstanceState.PENDING)
        return Instance(
            provider=self.name,
            id=ident,
            run_id=merged.get(LABEL_RUN_ID, ""),
            state=state,
            labels=merged,
            instance_type=shown(text(raw.get("InstanceType"))),
            region=region,
            launched_at=launched if isinstance(launched, datetime) else datetime.now(UTC),
            message=shown(state_name(raw)),
            data=dict(data),
        )




def _address(raw: Mapping[str, Any], key: str) -> str | None:
    """An instance's IP address field: None when missing, an error when it is there but is
    not an IP address (it would be handed to ssh as a host name)."""
    value = raw.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
    raise bad_answer("DescribeInstances", key, value, "an IP address")


def _ssh_answers(host: str, port: int) -> bool:
    """A quick, bounded look for an SSH banner (so READY means SSH can be tried)."""
    try:
        with socket.create_connection((host, port), timeout=SSH_PROBE_SECONDS) as sock:
            sock.settimeout(SSH_PROBE_SECONDS)
            return sock.recv(4).startswith(b"SSH-")
    except OSError:
        return False
