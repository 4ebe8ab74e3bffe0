"""Terminate once, then only poll: right after RunInstances, EC2 may not know the new
instance yet (eventual consistency) and answer InvalidInstanceID.NotFound. That is
not "gone": the provider keeps saying "not yet" and sends TerminateInstances again
when the instance shows up, and the controller's teardown waits for it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import boto3
import pytest

from ephemera.provider import Instance, InstanceState
from tests.fixtures.moto_server import inject

pytestmark = pytest.mark.timeout(120)

NOT_FOUND = "InvalidInstanceID.NotFound"


def state(instance_id, region="us-east-1"):
    ec2 = boto3.client("ec2", region_name=region)
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0][
        "State"]["Name"]


def by_id(body) -> bool:
    return any(key.startswith("InstanceId.") for key in body)


def not_yet_visible(provider, region, *, terminates: int, describes: int):
    """The first ``terminates`` TerminateInstances and ``describes`` DescribeInstances by
    id answer NotFound, as EC2 does for a moment after launch."""
    terms = inject(provider, region, "TerminateInstances",
                   lambda n, body: NOT_FOUND if n <= terminates else None)
    seen = []

    def describe(n, body):
        if not by_id(body):
            return None
        seen.append(body)
        return NOT_FOUND if len(seen) <= describes else None

    inject(provider, region, "DescribeInstances", describe)
    return terms


def test_not_found_right_after_launch_is_not_gone(contract_aws):
    aws = contract_aws
    inst = aws.provider.launch(aws.make_spec("run-nf"))
    # terminate looks once itself; terminate_confirmed looks again.
    terms = not_yet_visible(aws.provider, "us-east-1", terminates=1, describes=2)
    aws.provider.terminate(inst)
    assert state(inst.id) == "running"
    # Not confirmed while EC2 does not show it: "not yet", to be asked again.
    assert aws.provider.terminate_confirmed(inst) is False
    # It shows up alive: terminate is sent again, and then it is confirmed.
    again = aws.provider.poll(inst)
    assert again.state is InstanceState.TERMINATING and "sent again" in again.message
    assert len(terms) == 2
    assert state(inst.id) in ("shutting-down", "terminated")
    assert aws.provider.terminate_confirmed(inst) is True


def test_teardown_waits_through_not_found_until_terminated(contract_aws):
    from ephemera.lifecycle.teardown import teardown_run

    aws = contract_aws
    inst = aws.provider.launch(aws.make_spec("run-nf2"))
    not_yet_visible(aws.provider, "us-east-1", terminates=2, describes=3)
    result = teardown_run(aws.provider, "run-nf2", inst, timeout=20, log=lambda m: None)
    assert state(inst.id) == "terminated"
    assert result.verified, result.problems


def test_unknown_long_after_launch_is_gone(contract_aws):
    aws = contract_aws
    old = Instance(provider="aws", id="i-0123456789abcdef0", run_id="run-old",
                   state=InstanceState.RUNNING, region="us-east-1",
                   launched_at=datetime.now(UTC) - timedelta(minutes=30))
    aws.provider.terminate(old)
    assert aws.provider.poll(old).state is InstanceState.TERMINATED


def test_unknown_just_after_launch_is_not_yet_gone(contract_aws):
    aws = contract_aws
    new = Instance(provider="aws", id="i-0123456789abcdef1", run_id="run-new",
                   state=InstanceState.PENDING, region="us-east-1",
                   launched_at=datetime.now(UTC) - timedelta(seconds=5))
    aws.provider.terminate(new)
    polled = aws.provider.poll(new)
    assert polled.state is InstanceState.PENDING and "not visible" in polled.message


def test_instance_without_a_public_address_fails_fast(contract_aws, monkeypatch):
    """A subnet or policy that refuses the public address: FAILED at once with the
    reason, instead of "running, no address yet" until the boot timeout."""
    from ephemera_providers.aws import AWSProvider

    from ephemera.spec.settings import reset_settings

    monkeypatch.delenv("EPHEMERA_AWS_SSH_HOST_OVERRIDE")
    reset_settings()
    provider = AWSProvider(retry_base_seconds=0.01, retry_max_seconds=0.05)
    inst = provider.launch(contract_aws.make_spec("run-noip"))

    def strip_public(parsed, **_):
        for reservation in parsed.get("Reservations", []):
            for raw in reservation.get("Instances", []):
                raw.pop("PublicIpAddress", None)

    provider.client("ec2", "us-east-1").meta.events.register(
        "after-call.ec2.DescribeInstances", strip_public)
    polled = provider.poll(inst)
    assert polled.state is InstanceState.FAILED
    assert "without a public IPv4 address" in polled.message and "subnet-" in polled.message
    provider.terminate(polled)
