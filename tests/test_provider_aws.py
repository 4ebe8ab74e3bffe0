"""The aws provider against a real moto server on 127.0.0.1.

Errors moto does not produce (capacity, quota, throttling, auth) are injected with a
botocore ``before-call`` hook on the provider's own client: the hook answers some
calls with an AWS error and lets the rest through to moto unchanged.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from ephemera.errors import AuthError, ConfigError, NoCapacityError, QuotaError
from ephemera.provider import Instance, InstanceState, make_labels
from tests.fixtures.moto_server import DLAMI_PARAMETER, TEST_CIDR, inject

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def aws(contract_aws):
    return contract_aws


def ec2(region="us-east-1"):
    return boto3.client("ec2", region_name=region)


def describe(instance_id, region="us-east-1"):
    return ec2(region).describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def ephemera_leftovers(region):
    """Security groups and key pairs named like ephemera's, and live instances."""
    client = ec2(region)
    groups = [g["GroupName"] for g in client.describe_security_groups()["SecurityGroups"]
              if g["GroupName"].startswith("ephemera-")]
    keys = [k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]]
    live = [i["InstanceId"] for r in client.describe_instances(Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
        ["Reservations"] for i in r["Instances"]]
    return groups + keys + live


def test_launch_request_carries_everything(aws, aws_env):
    spec = aws.make_spec("run-req")
    spec = type(spec)(**{**spec.__dict__, "labels": {**spec.labels, "team": "infra"}})
    inst = aws.provider.launch(spec)
    assert inst.state is InstanceState.PENDING and inst.region == "us-east-1"
    raw = describe(inst.id)
    assert raw["InstanceType"] == "g5.xlarge"
    assert raw["ImageId"] == aws_env["amis"]["us-east-1"]
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags["ephemera:run-id"] == "run-req"
    assert tags["ephemera:job"] == "contract"
    assert tags["ephemera:owner"] == "tester"
    assert tags["ephemera:expires-at"] == spec.labels["expires-at"]
    assert tags["team"] == "infra" and tags["Name"] == "ephemera-run-req"
    # Key pair: the run's key, imported and tagged.
    assert raw["KeyName"] == "ephemera-run-req"
    key = ec2().describe_key_pairs(KeyNames=["ephemera-run-req"])["KeyPairs"][0]
    assert {t["Key"]: t["Value"] for t in key["Tags"]}["ephemera:run-id"] == "run-req"
    assert key["KeyType"] == "ed25519"
    # Security group: SSH from the configured CIDR, nothing else (on the network interface).
    group_ids = [g["GroupId"] for n in raw["NetworkInterfaces"] for g in n["Groups"]]
    assert len(group_ids) == 1
    group = ec2().describe_security_groups(GroupIds=group_ids)["SecurityGroups"][0]
    assert group["GroupName"] == "ephemera-run-req"
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]])
            for p in group["IpPermissions"]] == [("tcp", 22, 22, [TEST_CIDR])]
    assert {t["Key"]: t["Value"] for t in group["Tags"]}["ephemera:owner"] == "tester"
    # Dead-man switch: terminate on OS shutdown, and user-data that shuts down at expiry.
    attr = ec2().describe_instance_attribute(InstanceId=inst.id,
                                             Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    script = base64.b64decode(ec2().describe_instance_attribute(
        InstanceId=inst.id, Attribute="userData")["UserData"]["Value"]).decode()
    assert f"EXPIRES_AT={int(spec.expires_at.timestamp())}" in script
    assert "shutdown -h" in script and "halt" not in script.replace("# ", "")
    assert "systemctl enable --now docker" in script
    assert f"usermod -aG docker {aws.sshd.user}" in script  # the login user may use Docker
    # IMDSv2 required, gp3 root volume of the AMI's disk plus the spec's room, not spot.
    assert raw["MetadataOptions"]["HttpTokens"] == "required"
    volume_id = raw["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    volume = ec2().describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    assert volume["VolumeType"] == "gp3"
    image = ec2().describe_images(ImageIds=[raw["ImageId"]])["Images"][0]
    snapshot = image["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
    assert volume["Size"] == snapshot + spec.disk_gib and spec.disk_gib == 40
    assert raw.get("InstanceLifecycle") != "spot"
    # Launch is idempotent on the run id.
    assert aws.provider.launch(spec).id == inst.id


def test_spot_request(aws):
    spec = aws.make_spec("run-spot", options={"aws": {"ssh_user": "root"}, "spot": True})
    inst = aws.provider.launch(spec)
    raw = describe(inst.id)
    assert raw["InstanceLifecycle"] == "spot"
    assert inst.data["market"] == "spot"
    # Billed at the zone's spot price at launch, not the plan's on-demand price.
    zone = raw["Placement"]["AvailabilityZone"]
    history = ec2().describe_spot_price_history(InstanceTypes=["g5.xlarge"], AvailabilityZone=zone,
                                               ProductDescriptions=["Linux/UNIX"])
    prices = [float(h["SpotPrice"]) for h in history["SpotPriceHistory"]
              if h["AvailabilityZone"] == zone]
    assert float(inst.data["price_per_hour"]) == pytest.approx(min(prices))
    assert inst.data["price_source"] == f"AWS spot price history {zone} at launch"
    assert inst.data["availability_zone"] == zone and inst.data["region"] == "us-east-1"


def test_on_demand_launch_records_its_price(aws):
    inst = aws.provider.launch(aws.make_spec("run-price"))
    assert inst.data["market"] == "on-demand" and inst.data["region"] == "us-east-1"
    assert (inst.data["price_per_hour"], inst.data["price_source"]) == ("1.006", "test")


def test_region_failover_records_that_regions_price(aws):
    spec = aws.make_spec("run-price2", options={"regions": ["us-east-1", "us-east-2"]})
    inject(aws.provider, "us-east-1", "RunInstances", lambda n, body: "InsufficientInstanceCapacity")
    inst = aws.provider.launch(spec)
    assert inst.data["region"] == "us-east-2"
    # The built-in catalog prices g5.xlarge in us-east-1 and says so for other regions.
    assert inst.data["price_source"].endswith("(us-east-1 price)")


@pytest.mark.parametrize("disk_gib, expected", [(40, "snapshot+40"), (4, "snapshot+4"), (None, "snapshot+60")])
def test_root_volume_is_the_amis_disk_plus_the_jobs_room(aws, disk_gib, expected):
    inst = aws.provider.launch(aws.make_spec(f"run-disk-{disk_gib}", disk_gib=disk_gib))
    raw = describe(inst.id)
    image = ec2().describe_images(ImageIds=[raw["ImageId"]])["Images"][0]
    snapshot = image["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
    volume = ec2().describe_volumes(VolumeIds=[raw["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]])
    size = volume["Volumes"][0]["Size"]
    want = snapshot + int(expected.split("+")[1])
    assert snapshot > 4 and size == want and inst.data["disk_gib"] == str(want)


def test_ami_override_and_missing_parameter(aws, aws_env, monkeypatch):
    other = sorted(aws_env["amis"].values())[0]
    inst = aws.provider.launch(aws.make_spec("run-ami", options={"aws": {"ami": other}}))
    assert describe(inst.id)["ImageId"] == other
    boto3.client("ssm", region_name="us-east-1").delete_parameter(Name=DLAMI_PARAMETER)
    with pytest.raises(ConfigError, match="EPHEMERA_AWS_AMI"):
        aws.provider.launch(aws.make_spec("run-noami"))
    assert "ephemera-run-noami" not in ephemera_leftovers("us-east-1")


def test_capacity_fails_over_to_next_zone(aws):
    calls = inject(aws.provider, "us-east-1", "RunInstances",
                   lambda n, body: "InsufficientInstanceCapacity" if n <= 2 else None)
    inst = aws.provider.launch(aws.make_spec("run-az"))
    subnets = [c["NetworkInterface.1.SubnetId"] for c in calls]
    assert len(calls) == 3 and len(set(subnets)) == 3
    assert describe(inst.id)["SubnetId"] == subnets[2]


def test_capacity_fails_over_to_next_region(aws, monkeypatch):
    spec = aws.make_spec("run-region", options={"aws": {"ssh_user": "root"},
                                                "regions": ["us-east-1", "us-west-2"]})
    east = inject(aws.provider, "us-east-1", "RunInstances",
                  lambda n, body: "InsufficientInstanceCapacity")
    inst = aws.provider.launch(spec)
    assert len(east) == 5  # every zone of us-east-1 that offers g5.xlarge was tried
    assert inst.region == "us-west-2"
    assert describe(inst.id, "us-west-2")["Placement"]["AvailabilityZone"].startswith("us-west-2")
    assert ephemera_leftovers("us-east-1") == []  # group and key of the failed region removed


def test_no_capacity_anywhere_raises_and_leaves_nothing(aws):
    spec = aws.make_spec("run-none", options={"regions": ["us-east-1", "us-west-2"]})
    for region in ("us-east-1", "us-west-2"):
        inject(aws.provider, region, "RunInstances",
               lambda n, body: "InsufficientInstanceCapacity" if n % 2 else "Unsupported")
    with pytest.raises(NoCapacityError, match="g5.xlarge") as err:
        aws.provider.launch(spec)
    assert "us-east-1" in str(err.value) and "us-west-2" in str(err.value)
    assert ephemera_leftovers("us-east-1") == [] and ephemera_leftovers("us-west-2") == []


def test_spot_falls_back_to_on_demand(aws):
    calls = inject(aws.provider, "us-east-1", "RunInstances",
                   lambda n, body: "InsufficientInstanceCapacity"
                   if "InstanceMarketOptions.MarketType" in body else None)
    inst = aws.provider.launch(aws.make_spec("run-fallback", options={"spot": True}))
    assert sum("InstanceMarketOptions.MarketType" in c for c in calls) == 5
    assert describe(inst.id).get("InstanceLifecycle") != "spot"
    assert inst.data["market"] == "on-demand"


def test_spot_without_fallback_gives_no_capacity(aws):
    inject(aws.provider, "us-east-1", "RunInstances",
           lambda n, body: "InsufficientInstanceCapacity"
           if "InstanceMarketOptions.MarketType" in body else None)
    with pytest.raises(NoCapacityError):
        aws.provider.launch(aws.make_spec("run-nofallback",
                                          options={"spot": True, "spot_fallback": False}))


def test_quota_skips_family_in_region(aws):
    east = inject(aws.provider, "us-east-1", "RunInstances", lambda n, body: "VcpuLimitExceeded")
    spec = aws.make_spec("run-quota", options={"regions": ["us-east-1", "us-west-2"]})
    inst = aws.provider.launch(spec)
    assert len(east) == 1 and inst.region == "us-west-2"
    assert aws.provider.skipped_families == {("us-east-1", "g5"): "VcpuLimitExceeded"}
    # Another g5 size later in the plan does not try us-east-1 again.
    from dataclasses import replace
    bigger = replace(spec.offer, instance_type="g5.2xlarge")
    inst2 = aws.provider.launch(replace(aws.make_spec("run-quota2", options=spec.options), offer=bigger))
    assert len(east) == 1 and inst2.region == "us-west-2"


def test_quota_everywhere_says_which_quota(aws):
    inject(aws.provider, "us-east-1", "RunInstances", lambda n, body: "VcpuLimitExceeded")
    with pytest.raises(QuotaError) as err:
        aws.provider.launch(aws.make_spec("run-quota3"))
    assert "Running On-Demand G and VT instances" in str(err.value)
    assert "us-east-1" in str(err.value)
    assert ephemera_leftovers("us-east-1") == []


@pytest.mark.parametrize("code,status", [("RequestLimitExceeded", 503), ("InternalError", 500)])
def test_throttling_and_5xx_are_retried(aws, code, status):
    calls = inject(aws.provider, "us-east-1", "RunInstances",
                   lambda n, body: (code, status) if n <= 3 else None)
    inst = aws.provider.launch(aws.make_spec("run-throttle"))
    assert len(calls) == 4
    assert describe(inst.id)["State"]["Name"] in ("pending", "running")
    # The same ClientToken on every retry, so AWS cannot start two machines.
    assert len({c["ClientToken"] for c in calls}) == 1


def test_auth_failure_aborts_at_once(aws):
    calls = inject(aws.provider, "us-east-1", "RunInstances", lambda n, body: "UnauthorizedOperation")
    with pytest.raises(AuthError, match="UnauthorizedOperation"):
        aws.provider.launch(aws.make_spec("run-auth", options={"regions": ["us-east-1", "us-west-2"]}))
    assert len(calls) == 1
    assert ephemera_leftovers("us-east-1") == [] and ephemera_leftovers("us-west-2") == []


def test_invalid_parameter_aborts_at_once(aws):
    calls = inject(aws.provider, "us-east-1", "RunInstances",
                   lambda n, body: "InvalidParameterValue")
    with pytest.raises(ConfigError, match="InvalidParameterValue"):
        aws.provider.launch(aws.make_spec("run-invalid", options={
            "regions": ["us-east-1", "us-west-2"]}))
    assert len(calls) == 1
    assert ephemera_leftovers("us-east-1") == [] and ephemera_leftovers("us-west-2") == []


def test_bad_cidr_names_the_field(aws, monkeypatch):
    with pytest.raises(ConfigError, match="ssh_cidr"):
        aws.provider.launch(aws.make_spec("run-cidr", options={"aws": {"ssh_cidr": "nonsense"}}))


def test_poll_ready_then_terminate_verified(aws, aws_env):
    sshd = aws_env["sshd"]
    inst = aws.provider.launch(aws.make_spec("run-life"))
    ready = aws.provider.poll(inst)
    assert ready.state is InstanceState.READY
    assert (ready.endpoint.host, ready.endpoint.port) == ("127.0.0.1", sshd.port)
    assert ready.endpoint.user == sshd.user and ready.endpoint.key_path == sshd.key_path
    # From a state file in another process: only the serialised instance is known.
    again = Instance.from_dict(ready.to_dict())
    aws.provider.terminate(again)
    for _ in range(20):
        if aws.provider.terminate_confirmed(again):
            break
    else:
        pytest.fail("termination not confirmed")
    assert describe(inst.id)["State"]["Name"] == "terminated"
    assert ephemera_leftovers("us-east-1") == []
    aws.provider.terminate(again)  # idempotent
    assert aws.provider.poll(again).state is InstanceState.TERMINATED


def test_private_address_behind_bastion(aws, monkeypatch):
    from ephemera_providers.aws import AWSProvider

    from ephemera.spec.settings import reset_settings

    monkeypatch.delenv("EPHEMERA_AWS_SSH_HOST_OVERRIDE")
    monkeypatch.setenv("EPHEMERA_AWS_USE_PRIVATE_IP", "true")
    monkeypatch.setenv("EPHEMERA_AWS_BASTION", "ubuntu@127.0.0.1:2222")
    reset_settings()
    provider = AWSProvider()
    inst = provider.launch(aws.make_spec("run-private"))
    polled = provider.poll(inst)
    raw = describe(inst.id)
    assert polled.state is InstanceState.READY  # behind a bastion: no direct probe
    assert polled.endpoint.host == raw["PrivateIpAddress"]
    assert polled.endpoint.proxy_jump == "ubuntu@127.0.0.1:2222"
    provider.terminate(polled)
    assert provider.terminate_confirmed(polled)


def _launch_for(aws, run_id, owner, expires):
    spec = aws.make_spec(run_id)
    spec = type(spec)(**{**spec.__dict__, "expires_at": expires,
                         "labels": make_labels(run_id, "contract", owner, expires)})
    return aws.provider.launch(spec)


def _reap(**kwargs):
    from ephemera.lifecycle.reaper import reap

    return reap(["aws"], now=datetime.now(UTC), log=lambda m: None, **kwargs)


def _state(instance_id):
    return describe(instance_id)["State"]["Name"]


def test_reap_removes_only_expired(aws):
    now = datetime.now(UTC)
    past, future = now - timedelta(minutes=5), now + timedelta(hours=1)
    old = _launch_for(aws, "run-old", "tester", past)
    fresh = _launch_for(aws, "run-fresh", "tester", future)
    other = _launch_for(aws, "run-other", "someone", past)
    # An orphan: instance gone, group and key left behind (ephemera died mid-teardown).
    orphan = _launch_for(aws, "run-orphan", "tester", past)
    ec2().terminate_instances(InstanceIds=[orphan.id])
    # A group that merely looks like ephemera's (no tags) is never touched.
    ec2().create_security_group(GroupName="ephemera-handmade", Description="not ours")

    planned = _reap(owner="tester", dry_run=True)
    assert sorted(i["run_id"] for i in planned.expired) == ["run-old", "run-orphan", "run-orphan"]
    assert _state(old.id) in ("pending", "running")
    assert "ephemera-run-orphan" in ephemera_leftovers("us-east-1")

    done = _reap(owner="tester", dry_run=False)
    assert all(item["verified"] for item in done.expired), done.expired
    assert _state(old.id) == "terminated"
    assert _state(fresh.id) in ("pending", "running")
    assert _state(other.id) in ("pending", "running")
    names = ephemera_leftovers("us-east-1")
    for gone in ("ephemera-run-orphan", "ephemera-run-old"):
        assert gone not in names
    assert {"ephemera-handmade", "ephemera-run-fresh", "ephemera-run-other"} <= set(names)
    # Without an owner, every expired run goes; the fresh one stays.
    _reap(owner=None, dry_run=False)
    assert _state(other.id) == "terminated" and _state(fresh.id) in ("pending", "running")


def test_reap_cli_dry_run_lists_and_touches_nothing(aws):
    from click.testing import CliRunner

    from ephemera.cli import cli

    old = _launch_for(aws, "run-cli", "tester", datetime.now(UTC) - timedelta(minutes=1))
    result = CliRunner().invoke(cli, ["reap", "--provider", "aws", "--dry-run", "--all-owners"])
    assert result.exit_code == 0, result.output
    assert f"would terminate: aws {old.id} (run run-cli" in result.output
    assert _state(old.id) in ("pending", "running")


def test_find_by_labels(aws):
    inst = aws.provider.launch(aws.make_spec("run-find"))
    found = aws.provider.find({"run-id": "run-find"})
    assert [i.id for i in found] == [inst.id]
    assert found[0].labels["owner"] == "tester"
    assert found[0].data["security_group_id"] == inst.data["security_group_id"]
    assert aws.provider.find({"run-id": "nope"}) == []


def test_check_reports_credentials(aws_env):
    from ephemera_providers.aws import AWSProvider

    ok, detail = AWSProvider.check()
    assert ok and "credentials from env" in detail


def _price_list_entry(instance_type: str, region: str, usd: str) -> str:
    """One GetProducts PriceList item, shaped like AWS's (trimmed to what is read)."""
    return json.dumps({
        "product": {"productFamily": "Compute Instance", "attributes": {
            "instanceType": instance_type, "regionCode": region, "operatingSystem": "Linux",
            "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used"}},
        "serviceCode": "AmazonEC2",
        "terms": {"OnDemand": {"SKU.JRTCKXETXF": {"priceDimensions": {
            "SKU.JRTCKXETXF.6YS6EN2CT7": {"unit": "Hrs", "pricePerUnit": {"USD": usd},
                                          "description": f"${usd} per On Demand Linux {instance_type}"}}}}},
    })


def test_catalog_refresh_aws(aws, monkeypatch, tmp_path):
    """Price List API answers through botocore's Stubber (moto answers 500 there); spot
    price history from moto; the result lands in the user's cache and planning uses it."""
    from botocore.stub import ANY, Stubber
    from click.testing import CliRunner
    from ephemera_providers import aws_prices

    from ephemera.cli import cli
    from ephemera.sizing.catalog import builtin_aws_catalog, load_cached_offers
    from ephemera.spec.settings import reset_settings

    # The refreshed cache goes to this test's own cache dir, never the user's.
    monkeypatch.setenv("EPHEMERA_CACHE_DIR", str(tmp_path / "cache"))
    reset_settings()
    types = sorted({o.instance_type for o in builtin_aws_catalog() if o.provider == "aws"})
    stub = Stubber(aws.provider.client("pricing", "us-east-1"))
    for kind in types:
        listed = [_price_list_entry(kind, "us-west-2", "1.2345")] if kind == "g5.xlarge" else []
        stub.add_response("get_products", {"FormatVersion": "aws_v1", "PriceList": listed},
                          {"ServiceCode": "AmazonEC2", "Filters": ANY, "MaxResults": 100})
    monkeypatch.setattr(aws_prices, "make_provider", lambda: aws.provider)
    with stub:
        result = CliRunner().invoke(cli, ["catalog", "refresh", "aws", "--region", "us-west-2", "--json"])
    assert result.exit_code == 0, result.output
    stub.assert_no_pending_responses()
    assert (tmp_path / "cache" / "catalog" / "aws.json").exists()
    cached = load_cached_offers("aws")
    on_demand = [o for o in cached if not o.spot]
    assert [(o.instance_type, o.region, o.price_per_hour) for o in on_demand] == [
        ("g5.xlarge", "us-west-2", 1.2345)]
    assert on_demand[0].gpu == "A10G" and "Price List API" in on_demand[0].price_source
    spot = [o for o in cached if o.spot]
    assert spot and all(o.instance_type == "g5.xlarge" and o.price_per_hour > 0 for o in spot)
    # Planning now sees the refreshed price.
    from ephemera.provider import OfferRequest
    assert [o.price_per_hour for o in aws.provider.offers(OfferRequest())] == [1.2345]
    shown = CliRunner().invoke(cli, ["catalog", "show", "aws"])
    assert shown.exit_code == 0 and "1.2345" in shown.output


def test_one_call_with_its_retries_is_bounded_in_time(aws):
    """Throttling that never ends: the call gives up after its time budget, not after
    minutes of attempts (a teardown or a deadline must not wait on one call)."""
    import time

    from botocore.exceptions import ClientError
    from ephemera_providers.aws import AWSProvider

    from ephemera.errors import EphemeraError

    provider = AWSProvider(retry_attempts=1000, retry_base_seconds=0.05, retry_max_seconds=0.2,
                           call_seconds=1.5)
    client = provider.client("ec2", "us-east-1")
    calls = []

    def throttle(**_kwargs):
        calls.append(1)
        raise ClientError({"Error": {"Code": "RequestLimitExceeded", "Message": "slow down"}},
                          "DescribeInstances")

    client.meta.events.register("before-call.ec2.DescribeInstances", throttle)
    started = time.monotonic()
    with pytest.raises(EphemeraError):
        provider._call("ec2", "us-east-1", "describe_instances")
    took = time.monotonic() - started
    assert 1.5 <= took < 4, f"the call took {took:.1f}s"
    assert len(calls) > 3   # it did retry while there was time
