"""vCPU quotas read before a launch: a region whose quota is below the offer's vCPUs is
skipped before anything is created there, with the quota code and how to raise it.
The moto server answers the EC2 quotas from tests.fixtures.moto_server.EC2_QUOTAS."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ephemera.errors import NoCapacityError, QuotaError
from tests.fixtures.moto_server import count_calls, inject

pytestmark = pytest.mark.timeout(120)

G_ON_DEMAND, G_SPOT, P_ON_DEMAND = "L-DB2E81BA", "L-3819A6DF", "L-417A185B"


def test_quota_codes_by_class_and_market():
    from ephemera_providers.aws_quotas import quota_for

    assert quota_for("g5.xlarge", "on-demand")[0] == G_ON_DEMAND
    assert quota_for("g6e.12xlarge", "spot")[0] == G_SPOT
    assert quota_for("vt1.3xlarge", "on-demand")[0] == G_ON_DEMAND
    assert quota_for("p4d.24xlarge", "on-demand")[0] == P_ON_DEMAND
    assert quota_for("p5.48xlarge", "spot")[0] == "L-7212CCBC"
    assert quota_for("inf2.xlarge", "on-demand") is None


def test_region_below_quota_is_skipped_before_anything_is_made(contract_aws, aws_env):
    aws = contract_aws
    aws_env["quotas"][("us-east-1", G_ON_DEMAND)] = 0
    imports = {r: count_calls(aws.provider, r, "ImportKeyPair") for r in ("us-east-1", "us-west-2")}
    groups = count_calls(aws.provider, "us-east-1", "CreateSecurityGroup")
    runs = count_calls(aws.provider, "us-east-1", "RunInstances")
    inst = aws.provider.launch(aws.make_spec("run-q1", options={
        "regions": ["us-east-1", "us-west-2"]}))
    assert inst.region == "us-west-2"
    assert imports["us-east-1"] == [] and groups == [] and runs == []
    assert len(imports["us-west-2"]) == 1


def test_quota_everywhere_names_the_code_and_how_to_raise_it(contract_aws, aws_env):
    aws = contract_aws
    for region in ("us-east-1", "us-west-2"):
        aws_env["quotas"][(region, G_ON_DEMAND)] = 2
    with pytest.raises(QuotaError) as err:
        aws.provider.launch(aws.make_spec("run-q2", options={"regions": ["us-east-1", "us-west-2"]}))
    text = str(err.value)
    assert "L-DB2E81BA" in text and "Running On-Demand G and VT instances" in text
    assert "is 2 vCPUs, the instance needs 4" in text
    assert ("request-service-quota-increase --service-code ec2 --quota-code L-DB2E81BA "
            "--desired-value 4 --region us-west-2") in text


def test_quota_is_read_once_per_region(contract_aws):
    aws = contract_aws
    reads = count_calls(aws.provider, "us-east-1", "GetServiceQuota", service="service-quotas")
    aws.provider.launch(aws.make_spec("run-q3"))
    aws.provider.launch(aws.make_spec("run-q4"))
    assert len(reads) == 1


def test_low_spot_quota_goes_straight_to_on_demand(contract_aws, aws_env):
    aws = contract_aws
    aws_env["quotas"][("us-east-1", G_SPOT)] = 0
    runs = count_calls(aws.provider, "us-east-1", "RunInstances")
    inst = aws.provider.launch(aws.make_spec("run-q5", options={"spot": True}))
    assert inst.data["market"] == "on-demand"
    assert [("InstanceMarketOptions.MarketType" in r) for r in runs] == [False]


def test_low_spot_quota_without_fallback_is_a_quota_error(contract_aws, aws_env):
    aws = contract_aws
    aws_env["quotas"][("us-east-1", G_SPOT)] = 0
    with pytest.raises(QuotaError, match="L-3819A6DF"):
        aws.provider.launch(aws.make_spec("run-q6", options={"spot": True, "spot_fallback": False}))


def test_p_instances_draw_from_the_p_quota(contract_aws, aws_env):
    aws = contract_aws
    aws_env["quotas"][("us-east-1", P_ON_DEMAND)] = 0
    base = aws.make_spec("run-q7")
    spec = replace(base, offer=replace(base.offer, instance_type="p4d.24xlarge", vcpus=96))
    with pytest.raises(QuotaError, match="L-417A185B"):
        aws.provider.launch(spec)


def test_without_an_applied_value_the_default_quota_counts(contract_aws, aws_env):
    aws = contract_aws
    aws_env["quotas"][("us-east-1", G_ON_DEMAND)] = None
    aws_env["default_quotas"][("us-east-1", G_ON_DEMAND)] = 0
    with pytest.raises(QuotaError, match="L-DB2E81BA 'Running On-Demand G and VT instances' is 0 vCPUs"):
        aws.provider.launch(aws.make_spec("run-q8"))


def test_unreadable_quota_does_not_stop_the_launch(contract_aws):
    aws = contract_aws
    inject(aws.provider, "us-east-1", "GetServiceQuota", lambda n, body: "AccessDeniedException",
           service="service-quotas")
    inst = aws.provider.launch(aws.make_spec("run-q8b"))
    assert inst.region == "us-east-1"


def test_quota_error_from_run_instances_still_skips_the_region(contract_aws):
    """The quota read can be stale or unreadable; RunInstances has the last word."""
    aws = contract_aws
    inject(aws.provider, "us-east-1", "RunInstances", lambda n, body: "VcpuLimitExceeded")
    with pytest.raises(QuotaError, match="L-DB2E81BA"):
        aws.provider.launch(aws.make_spec("run-q9"))
    with pytest.raises((QuotaError, NoCapacityError)):
        aws.provider.launch(aws.make_spec("run-q10"))
