"""The SSH rule of an AWS run opens port 22 to one small network at most: a configured
CIDR wider than /24, or with host bits set, is refused before anything is created,
unless the value ends with '!' (allowed on purpose)."""

from __future__ import annotations

import boto3
import pytest
from ephemera_providers.aws_common import checked_cidr

from ephemera.errors import ConfigError

FIELD = "resources.aws.ssh_cidr / EPHEMERA_AWS_SSH_CIDR"


@pytest.mark.parametrize(("value", "network"), [
    ("203.0.113.7/32", "203.0.113.7/32"),
    ("203.0.113.7", "203.0.113.7/32"),
    ("198.51.100.0/24", "198.51.100.0/24"),
    (" 198.51.100.128/25 ", "198.51.100.128/25"),
    ("2001:db8::/64", "2001:db8::/64"),
])
def test_narrow_networks_pass(value, network):
    assert checked_cidr(value, FIELD) == network


@pytest.mark.parametrize(("value", "says"), [
    ("198.51.0.0/16", "wider than /24"),
    ("0.0.0.0/0", "wider than /24"),
    ("2001:db8::/48", "wider than /64"),
    ("198.51.100.5/16", "host bits set"),
    ("198.51.100.9/24", "host bits set"),
])
def test_wide_or_host_bits_are_refused_naming_the_setting(value, says):
    with pytest.raises(ConfigError) as err:
        checked_cidr(value, FIELD)
    assert FIELD in str(err.value) and says in str(err.value) and value in str(err.value)
    assert "'!'" in err.value.hint


def test_host_bits_hint_offers_the_single_address():
    with pytest.raises(ConfigError) as err:
        checked_cidr("198.51.100.5/16", FIELD)
    assert "198.51.100.5/32" in err.value.hint and "198.51.0.0/16!" in err.value.hint


@pytest.mark.parametrize(("value", "network"), [
    ("198.51.0.0/16!", "198.51.0.0/16"),
    ("198.51.100.5/16!", "198.51.0.0/16"),
    ("0.0.0.0/0 !", "0.0.0.0/0"),
])
def test_a_trailing_bang_forces_the_network(value, network):
    assert checked_cidr(value, FIELD) == network


@pytest.mark.parametrize("value", ["nonsense", "198.51.0.0/33!", "!"])
def test_not_a_cidr_is_refused(value):
    with pytest.raises(ConfigError, match="is not a CIDR"):
        checked_cidr(value, FIELD)


@pytest.mark.timeout(120)
def test_launch_refuses_a_wide_setting_and_creates_nothing(contract_aws, monkeypatch):
    from ephemera.spec.settings import reset_settings

    monkeypatch.setenv("EPHEMERA_AWS_SSH_CIDR", "198.51.0.0/16")
    reset_settings()
    provider = type(contract_aws.provider)(retry_base_seconds=0.01, retry_max_seconds=0.05)
    with pytest.raises(ConfigError, match="EPHEMERA_AWS_SSH_CIDR"):
        provider.launch(contract_aws.make_spec("run-wide"))
    ec2 = boto3.client("ec2", region_name="us-east-1")
    groups = [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]]
    assert "ephemera-run-wide" not in groups
    assert ec2.describe_key_pairs()["KeyPairs"] == []
    live = [i for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    assert live == []


@pytest.mark.timeout(120)
def test_launch_with_a_forced_wide_job_option_opens_that_network(contract_aws):
    spec = contract_aws.make_spec("run-forced", options={"aws": {
        "ssh_user": contract_aws.sshd.user, "ssh_cidr": "198.51.0.0/16!"}})
    instance = contract_aws.provider.launch(spec)
    try:
        ec2 = boto3.client("ec2", region_name="us-east-1")
        group = ec2.describe_security_groups(
            GroupIds=[instance.data["security_group_id"]])["SecurityGroups"][0]
        ranges = [r["CidrIp"] for p in group["IpPermissions"] for r in p.get("IpRanges", [])]
        assert ranges == ["198.51.0.0/16"]
    finally:
        contract_aws.provider.terminate(instance)
