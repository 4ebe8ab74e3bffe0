"""Launch failover on errors real accounts give and moto does not: spot without its
service-linked role, a region the account has not enabled, an offer AWS refuses in
one region, and the price cap on an on-demand fallback. Errors are injected on the
provider's own clients (tests.fixtures.moto_server.inject); the rest is moto."""

from __future__ import annotations

from dataclasses import replace

import boto3
import pytest

from ephemera.errors import NoCapacityError
from tests.fixtures.moto_server import count_calls, inject

pytestmark = pytest.mark.timeout(120)

SPOT_ROLE = "AuthFailure.ServiceLinkedRoleCreationNotPermitted"


def is_spot(body) -> bool:
    return "InstanceMarketOptions.MarketType" in body


def lifecycle(instance_id, region="us-east-1"):
    ec2 = boto3.client("ec2", region_name=region)
    raw = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return raw.get("InstanceLifecycle", "on-demand")


def leftovers(region):
    ec2 = boto3.client("ec2", region_name=region)
    groups = [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]
              if g["GroupName"].startswith("ephemera-")]
    keys = [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]]
    return groups + keys


def test_spot_without_its_role_falls_back_to_on_demand_with_a_hint(contract_aws):
    aws = contract_aws
    calls = inject(aws.provider, "us-east-1", "RunInstances",
                   lambda n, body: SPOT_ROLE if is_spot(body) else None)
    inst = aws.provider.launch(aws.make_spec("run-slr", options={"spot": True}))
    # One spot attempt only: the role is missing for the whole account, not one zone.
    assert [is_spot(c) for c in calls] == [True, False]
    assert lifecycle(inst.id) == "on-demand"
    assert inst.data["market"] == "on-demand"
    assert "create-service-linked-role --aws-service-name spot.amazonaws.com" in inst.message
    assert "spot.amazonaws.com" in inst.data["notes"]
    # A later launch by the same provider does not try spot again.
    second = aws.provider.launch(aws.make_spec("run-slr2", options={"spot": True}))
    assert [is_spot(c) for c in calls[2:]] == [False]
    assert second.data["market"] == "on-demand"


def test_spot_without_its_role_and_no_fallback_says_why(contract_aws):
    aws = contract_aws
    inject(aws.provider, "us-east-1", "RunInstances",
           lambda n, body: SPOT_ROLE if is_spot(body) else None)
    with pytest.raises(NoCapacityError) as err:
        aws.provider.launch(aws.make_spec("run-slr-nofb", options={
            "spot": True, "spot_fallback": False}))
    assert SPOT_ROLE in str(err.value)
    assert "AWSServiceRoleForEC2Spot" in str(err.value)
    assert leftovers("us-east-1") == []


def test_region_not_enabled_is_skipped(contract_aws):
    aws = contract_aws
    spec = aws.make_spec("run-optin", options={"regions": ["us-east-1", "us-west-2"]})
    inject(aws.provider, "us-east-1", "GetParameter", lambda n, body: "OptInRequired",
           service="ssm")
    inst = aws.provider.launch(spec)
    assert inst.region == "us-west-2"
    assert leftovers("us-east-1") == []


def test_region_not_enabled_anywhere_is_no_capacity_naming_it(contract_aws):
    aws = contract_aws
    inject(aws.provider, "us-east-1", "RunInstances", lambda n, body: "OptInRequired")
    with pytest.raises(NoCapacityError, match="not enabled for this account") as err:
        aws.provider.launch(aws.make_spec("run-optin2"))
    assert "Account > AWS Regions" in str(err.value)
    assert leftovers("us-east-1") == []


def test_invalid_parameter_combination_skips_the_offer_in_that_region(contract_aws):
    aws = contract_aws
    east = inject(aws.provider, "us-east-1", "RunInstances",
                  lambda n, body: "InvalidParameterCombination")
    spec = aws.make_spec("run-ipc", options={"regions": ["us-east-1", "us-west-2"]})
    inst = aws.provider.launch(spec)
    assert len(east) == 1  # not every zone: the offer is refused in the region
    assert inst.region == "us-west-2"
    assert leftovers("us-east-1") == []


def test_invalid_parameter_combination_everywhere_says_why(contract_aws):
    aws = contract_aws
    inject(aws.provider, "us-east-1", "RunInstances",
           lambda n, body: "InvalidParameterCombination")
    with pytest.raises(NoCapacityError) as err:
        aws.provider.launch(aws.make_spec("run-ipc2"))
    text = str(err.value)
    assert "InvalidParameterCombination" in text and "g5.xlarge skipped here" in text
    assert "refuses this instance type" in text


def test_on_demand_fallback_above_the_price_cap_is_refused(contract_aws):
    aws = contract_aws
    calls = inject(aws.provider, "us-east-1", "RunInstances",
                   lambda n, body: "InsufficientInstanceCapacity" if is_spot(body) else None)
    base = aws.make_spec("run-cap")
    # A spot offer at 0.40/h under a 0.50/h cap; on-demand g5.xlarge costs 1.006/h.
    spec = replace(base, offer=replace(base.offer, spot=True, price_per_hour=0.40),
                   options={**base.options, "max_price_per_hour": 0.5})
    with pytest.raises(NoCapacityError) as err:
        aws.provider.launch(spec)
    text = str(err.value)
    assert "on-demand fallback refused" in text and "max_price_per_hour $0.5/h" in text
    assert "$1.006/h" in text
    assert calls and all(is_spot(c) for c in calls)
    # Spot itself is capped by AWS at the same price.
    assert {c["InstanceMarketOptions.SpotOptions.MaxPrice"] for c in calls} == {"0.5000"}
    assert leftovers("us-east-1") == []


def test_on_demand_fallback_under_the_cap_is_launched(contract_aws):
    aws = contract_aws
    inject(aws.provider, "us-east-1", "RunInstances",
           lambda n, body: "InsufficientInstanceCapacity" if is_spot(body) else None)
    base = aws.make_spec("run-cap-ok")
    spec = replace(base, offer=replace(base.offer, spot=True, price_per_hour=0.40),
                   options={**base.options, "max_price_per_hour": 1.5})
    inst = aws.provider.launch(spec)
    assert inst.data["market"] == "on-demand"
    assert float(inst.data["price_per_hour"]) == pytest.approx(1.006)
    assert "on-demand" in inst.data["notes"]


def test_public_address_is_asked_for_on_the_interface(contract_aws):
    aws = contract_aws
    calls = count_calls(aws.provider, "us-east-1", "RunInstances")
    aws.provider.launch(aws.make_spec("run-pubip"))
    body = calls[0]
    assert str(body["NetworkInterface.1.AssociatePublicIpAddress"]).lower() == "true"
    assert str(body["NetworkInterface.1.DeviceIndex"]) == "0"
    assert body["NetworkInterface.1.SecurityGroupId.1"].startswith("sg-")
    assert "SecurityGroupId.1" not in body and "SubnetId" not in body


def test_spot_price_that_cannot_be_read_falls_back_to_the_catalog_at_once(contract_aws):
    aws = contract_aws
    reads = inject(aws.provider, "us-east-1", "DescribeSpotPriceHistory",
                   lambda n, body: ("ServiceUnavailable", 503))
    base = aws.make_spec("run-spotprice")
    spec = replace(base, offer=replace(base.offer, spot=True, price_per_hour=0.42,
                                       price_source="catalog spot"))
    inst = aws.provider.launch(spec)
    assert len(reads) == 1  # not retried: the launch does not wait for it
    assert inst.data["market"] == "spot"
    assert (inst.data["price_per_hour"], inst.data["price_source"]) == ("0.42", "catalog spot")
