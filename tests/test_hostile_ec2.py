"""Hostile AWS answers for the aws provider's readers: DescribeInstances (State, Tags,
addresses, network interfaces, LaunchTime, lifecycle, paging), DescribeImages,
DescribeRegions, DescribeSecurityGroups/KeyPairs, ssm:GetParameter, GetServiceQuota,
DescribeSpotPriceHistory and the Price List API's JSON.

Each property: the reader returns a valid value or raises ephemera's typed error,
within the time and memory bounds of tests/hostile.py. Plain functions are called
directly; readers inside provider methods get their answers from a botocore
``before-call`` hook on the provider's own clients, so no request leaves the process.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from unittest import mock

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from ephemera_providers import aws as aws_module
from ephemera_providers.aws import AWSProvider
from ephemera_providers.aws_common import Options, attached_groups, data_from_instance, from_tags
from ephemera_providers.aws_prices import on_demand_price, spot_price_now, spot_prices
from ephemera_providers.aws_quotas import QuotaReader
from ephemera_providers.aws_resources import SkipRegion
from hypothesis import given
from hypothesis import strategies as st

from ephemera.errors import EphemeraError, IncompleteSearchError, InfraError
from ephemera.provider import Instance, InstanceState
from ephemera.spec.settings import get_settings
from tests.hostile import bounded

REGION = "us-east-1"
INSTANCE_ID = "i-0123456789abcdef0"
TYPED = (EphemeraError,)

# Values that have broken readers of JSON-ish answers elsewhere.
NASTY = st.sampled_from([
    "", " ", "0", "-1", "nan", "NaN", "inf", "-inf", "1e309", "9" * 5000, "x" * 100_000,
    "2026-13-45T99:99:99Z", "pending", "running", "terminated", "shutting-down", "exploded",
    "\x00", "\u202e", INSTANCE_ID, "127.0.0.1", "::1", "999.1.1.1", "-oProxyCommand=sh",
    "ami-0abc", "/dev/sda1", "us-east-1", "ephemera:run-id", "aws:x", "Name", "{}", "[",
])
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(), st.text(max_size=20), NASTY)
HOSTILE = st.recursive(
    SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                    st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


def field(good):
    """A field's value: the documented kind, or anything at all."""
    return st.one_of(good, good, HOSTILE)


def obj(**fields):
    """An object whose keys may each be missing, right, or hostile; or not an object."""
    return st.one_of(
        st.fixed_dictionaries({}, optional={k: field(v) for k, v in fields.items()}),
        st.fixed_dictionaries({}, optional={k: field(v) for k, v in fields.items()}),
        HOSTILE)


def reply(**fields):
    """A whole answer (botocore always gives an object), keys missing, right or hostile."""
    return st.fixed_dictionaries({}, optional={k: field(v) for k, v in fields.items()})


STATES = st.sampled_from(["pending", "running", "stopping", "stopped", "shutting-down",
                          "terminated", "rebooting", "exploded", ""])
TAG = obj(Key=st.sampled_from(["ephemera:run-id", "ephemera:job", "Name", "aws:x", "team"]),
          Value=st.one_of(st.just("hostile-run"), st.text(max_size=10)))
GROUP = obj(GroupId=st.sampled_from(["sg-1", "sg-2"]),
            GroupName=st.sampled_from(["ephemera-hostile-run", "default"]))
INSTANCE = obj(
    InstanceId=st.sampled_from([INSTANCE_ID, "i-1", "", "i 1", "i-" + "f" * 200]),
    State=obj(Name=STATES, Code=st.integers()),
    StateReason=obj(Message=st.text(max_size=20)),
    Tags=st.lists(TAG, max_size=4),
    PublicIpAddress=st.sampled_from(["203.0.113.7", "2001:db8::1"]),
    PrivateIpAddress=st.sampled_from(["192.0.2.7"]),
    SubnetId=st.just("subnet-1"),
    KeyName=st.sampled_from(["ephemera-hostile-run", "mine"]),
    SecurityGroups=st.lists(GROUP, max_size=2),
    NetworkInterfaces=st.lists(obj(Groups=st.lists(GROUP, max_size=2)), max_size=2),
    BlockDeviceMappings=st.lists(obj(DeviceName=st.just("/dev/sda1"),
                                     Ebs=obj(VolumeId=st.just("vol-1"))), max_size=2),
    LaunchTime=st.datetimes(timezones=st.sampled_from([None, UTC])),
    InstanceLifecycle=st.sampled_from(["spot", "scheduled", "capacity-block"]),
    InstanceType=st.sampled_from(["g5.xlarge", "p5.48xlarge"]),
    Placement=obj(AvailabilityZone=st.sampled_from(["us-east-1a"])),
)
DESCRIBE = reply(Reservations=st.lists(obj(Instances=st.lists(INSTANCE, max_size=3)),
                                       max_size=3))


# ------------------------------------------------------- answers through a hook

ANSWERS: dict[str, object] = {}
_CLIENTS: dict = {}


def _answer(model, **_):
    if model.name not in ANSWERS:
        raise AssertionError(f"unexpected call {model.name}")
    answer = ANSWERS[model.name]
    parsed = answer() if callable(answer) else answer
    return AWSResponse("https://127.0.0.1/", 200, {}, None), parsed


def provider() -> AWSProvider:
    """A fresh provider whose clients answer from ANSWERS (made once, then shared)."""
    made = AWSProvider(get_settings(), session=boto3.session.Session(
        aws_access_key_id="hostile", aws_secret_access_key="hostile", region_name=REGION),
        retry_attempts=1, call_seconds=1)
    if not _CLIENTS:
        for service in ("ec2", "ssm", "pricing", "service-quotas"):
            client = made.client(service, REGION)
            client.meta.events.register("before-call", _answer)
    made._clients = _CLIENTS if _CLIENTS else made._clients
    _CLIENTS.update(made._clients)
    return made


def answering(**answers):
    ANSWERS.clear()
    ANSWERS.update(answers)
    return provider()


def valid_instance(item: Instance, orphan: bool = False) -> None:
    assert isinstance(item, Instance) and item.provider == "aws"
    assert isinstance(item.id, str) and item.id and len(item.id) <= 128
    assert isinstance(item.state, InstanceState)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in item.labels.items())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in item.data.items())
    assert isinstance(item.instance_type, str) and len(item.instance_type) < 300
    assert isinstance(item.message, str) and len(item.message) < 1000
    if orphan and item.data.get("kind"):  # a left-over group or key pair: no launch time
        return
    assert isinstance(item.launched_at, datetime) and item.launched_at.tzinfo is not None


# ----------------------------------------------------------- plain functions

@given(st.one_of(st.lists(TAG, max_size=6), HOSTILE))
def test_tags(tags):
    labels = bounded(lambda: from_tags(tags), ()).value
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
    assert "Name" not in labels and not any(k.startswith("aws:") for k in labels)


def test_malformed_tags_are_skipped_and_good_ones_kept():
    tags = [{"Key": "ephemera:run-id", "Value": "r1"}, {"Key": None, "Value": "x"}, "Key",
            {"Value": "y"}, {"Key": "team", "Value": ["a"]}, {"Key": "team2"}]
    assert from_tags(tags) == {"run-id": "r1", "team2": ""}
    assert from_tags("ephemera:run-id") == {} and from_tags({"Key": "a"}) == {}


@given(INSTANCE.filter(lambda raw: isinstance(raw, dict)))
def test_instance_description(raw):
    data = bounded(lambda: data_from_instance(raw, REGION), ()).value
    assert all(isinstance(v, str) for v in data.values())
    assert data["market"] in ("spot", "on-demand")
    groups = attached_groups(raw)
    assert all(isinstance(g["GroupId"], str) for g in groups)


@given(INSTANCE.filter(lambda raw: isinstance(raw, dict)))
def test_instance_from_description(raw):
    outcome = bounded(lambda: provider()._instance_from(raw, REGION, data={}), TYPED)
    if outcome.error is None:
        valid_instance(outcome.value)
        assert outcome.value.id == raw["InstanceId"]
    else:
        assert isinstance(outcome.error, InfraError) and "InstanceId" in str(outcome.error)


# ---------------------------------------------------- DescribeInstances, poll

@given(DESCRIBE)
def test_describe_instances(answer):
    aws = answering(DescribeInstances=answer)
    outcome = bounded(lambda: aws._describe(REGION, []), TYPED)
    if outcome.error is None:
        for raw in outcome.value:
            valid_instance(aws._instance_from(raw, REGION, data=data_from_instance(raw, REGION)))
    else:
        assert "DescribeInstances" in str(outcome.error)


def test_a_page_token_that_repeats_ends_the_search():
    aws = answering(DescribeInstances={"Reservations": [], "NextToken": "again"})
    error = bounded(lambda: aws._describe(REGION, []), TYPED).error
    assert isinstance(error, InfraError) and "NextToken" in str(error)


@given(DESCRIBE, st.sampled_from(["", "1"]))
def test_poll(answer, private):
    aws = answering(DescribeInstances=answer)
    aws.settings.aws_use_private_ip = bool(private)
    launched = datetime.now(UTC) - timedelta(hours=1)
    item = Instance(provider="aws", id=INSTANCE_ID, run_id="hostile-run",
                    state=InstanceState.PENDING, region=REGION, launched_at=launched,
                    data={"region": REGION})
    with mock.patch.object(aws_module, "_ssh_answers", return_value=True):
        outcome = bounded(lambda: aws.poll(item), TYPED)
    if outcome.error is None:
        polled = outcome.value
        valid_instance(polled)
        if polled.endpoint is not None:
            assert polled.state is InstanceState.READY
            assert polled.endpoint.host[0] in "0123456789abcdef:" and " " not in polled.endpoint.host


def test_poll_refuses_an_address_that_is_not_one():
    answer = {"Reservations": [{"Instances": [{
        "InstanceId": INSTANCE_ID, "State": {"Name": "running"},
        "PublicIpAddress": "-oProxyCommand=sh"}]}]}
    aws = answering(DescribeInstances=answer)
    item = Instance(provider="aws", id=INSTANCE_ID, run_id="r", state=InstanceState.PENDING,
                    region=REGION, data={"region": REGION})
    error = bounded(lambda: aws.poll(item), TYPED).error
    assert isinstance(error, InfraError) and "PublicIpAddress" in str(error)


@given(DESCRIBE, reply(SecurityGroups=st.lists(obj(GroupId=st.just("sg-9"), Tags=st.lists(TAG)))),
       reply(KeyPairs=st.lists(obj(KeyName=st.just("ephemera-x"), Tags=st.lists(TAG)))))
def test_find(instances, groups, keys):
    aws = answering(DescribeInstances=instances, DescribeSecurityGroups=groups,
                    DescribeKeyPairs=keys)
    outcome = bounded(lambda: aws.find({"run-id": "hostile-run"}, regions=[REGION]), TYPED)
    if outcome.error is None:
        for item in outcome.value:
            valid_instance(item, orphan=True)
    else:
        assert isinstance(outcome.error, IncompleteSearchError)
        assert REGION in str(outcome.error) and "Traceback" not in str(outcome.error)


@given(reply(Regions=st.lists(obj(RegionName=st.sampled_from(["us-east-2", "eu-west-1"])),
                              max_size=4)))
def test_describe_regions(answer):
    aws = answering(DescribeRegions=answer)
    aws.settings.aws_regions = []
    failures: list[str] = []
    regions = bounded(lambda: aws.reap_regions(failures), ()).value
    assert regions and all(isinstance(r, str) and r.islower() for r in regions)
    assert all("DescribeRegions" in f for f in failures)


# ------------------------------------------------------ images, AMI parameter

@given(reply(Images=st.lists(obj(
    RootDeviceName=st.sampled_from(["/dev/sda1", "/dev/xvda"]),
    BlockDeviceMappings=st.lists(obj(DeviceName=st.sampled_from(["/dev/sda1", "/dev/xvda"]),
                                     Ebs=obj(VolumeSize=st.integers(0, 100))), max_size=3)),
    max_size=2)))
def test_describe_images(answer):
    aws = answering(DescribeImages=answer)
    outcome = bounded(lambda: aws._image_root(REGION, "ami-0abc"), TYPED)
    if outcome.error is None:
        root, size = outcome.value
        assert root.startswith("/dev/") and isinstance(size, int) and 0 <= size <= 65536
    else:
        assert "ami-0abc" in str(outcome.error)


@given(reply(Parameter=obj(Value=st.sampled_from(["ami-0123456789abcdef0"]))))
def test_ami_parameter(answer):
    aws = answering(GetParameter=answer)
    aws.settings.aws_ami = None
    outcome = bounded(lambda: aws._resolve_ami(REGION, Options({})), TYPED)
    if outcome.error is None:
        assert outcome.value == "ami-0123456789abcdef0"
    else:
        assert "Value" in str(outcome.error)


# ------------------------------------------------------------------ quotas

class QuotaClient:
    def __init__(self, answer):
        self.answer = answer

    def get_service_quota(self, **_):
        return self.answer

    get_aws_default_service_quota = get_service_quota


@given(reply(Quota=obj(Value=st.floats(min_value=0, max_value=1000))))
def test_service_quota(answer):
    reader = QuotaReader(lambda region: QuotaClient(answer))
    value = bounded(lambda: reader.value(REGION, "L-DB2E81BA"), ()).value
    assert value is None or (math.isfinite(value) and value >= 0)
    short = reader.shortfall(REGION, "g5.xlarge", "on-demand", 4)
    assert short is None or (short.value < 4 and short.reason())


# ------------------------------------------------------------------ prices

USD = st.sampled_from(["1.0060000000", "0.0000000000", "12.5"])
PRODUCT = obj(terms=obj(OnDemand=st.dictionaries(st.text(max_size=3), obj(
    priceDimensions=st.dictionaries(st.text(max_size=3), obj(pricePerUnit=obj(USD=USD)),
                                    max_size=2)), max_size=2)))
PRICE_ITEM = st.one_of(PRODUCT, PRODUCT.map(json.dumps), st.just("[" * 100_000),
                       st.text(max_size=50))


@given(reply(PriceList=st.lists(PRICE_ITEM, max_size=3)))
def test_price_list(answer):
    aws = answering(GetProducts=answer)
    outcome = bounded(lambda: on_demand_price(aws, "g5.xlarge", REGION), TYPED)
    if outcome.error is None:
        assert outcome.value is None or (math.isfinite(outcome.value) and outcome.value > 0)
    else:
        assert "g5.xlarge" in str(outcome.error)


SPOT = reply(SpotPriceHistory=st.lists(obj(
    SpotPrice=st.sampled_from(["0.4", "1.2"]), InstanceType=st.sampled_from(["g5.xlarge"]),
    AvailabilityZone=st.sampled_from(["us-east-1a", "us-east-1b"])), max_size=4))


@given(SPOT)
def test_spot_price_history(answer):
    aws = answering(DescribeSpotPriceHistory=answer)
    outcome = bounded(lambda: spot_prices(aws, ["g5.xlarge"], REGION), TYPED)
    if outcome.error is None:
        assert set(outcome.value) <= {"g5.xlarge"}
        assert all(math.isfinite(p) and p >= 0 for p in outcome.value.values())
    else:
        assert "DescribeSpotPriceHistory" in str(outcome.error)
    now = bounded(lambda: spot_price_now(aws, "g5.xlarge", REGION, "us-east-1a"), ()).value
    assert now is None or (math.isfinite(now) and now > 0)


def test_spot_history_that_pages_forever_ends():
    aws = answering(DescribeSpotPriceHistory={"SpotPriceHistory": [], "NextToken": "t"})
    error = bounded(lambda: spot_prices(aws, ["g5.xlarge"], REGION), TYPED).error
    assert isinstance(error, InfraError) and "NextToken" in str(error)


@pytest.mark.parametrize("usd", ["abc", "inf", "-1", "nan", None])
def test_a_price_that_is_not_one_is_named(usd):
    product = {"terms": {"OnDemand": {"t": {"priceDimensions": {"d": {
        "pricePerUnit": {"USD": usd}}}}}}}
    aws = answering(GetProducts={"PriceList": [json.dumps(product)]})
    outcome = bounded(lambda: on_demand_price(aws, "g5.xlarge", REGION), TYPED)
    if usd is None:
        assert outcome.value is None
    else:
        assert isinstance(outcome.error, InfraError) and "pricePerUnit.USD" in str(outcome.error)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, True, "8", None, [8]])
def test_a_quota_that_is_not_a_number_of_vcpus_is_unknown(value):
    reader = QuotaReader(lambda region: QuotaClient({"Quota": {"Value": value}}))
    assert reader.value(REGION, "L-DB2E81BA") is None
    assert reader.shortfall(REGION, "g5.xlarge", "on-demand", 4) is None


# ----------------------------------------------------------------- subnets

SUBNETS = reply(Subnets=st.lists(obj(
    SubnetId=st.sampled_from(["subnet-1", "subnet-2"]), VpcId=st.just("vpc-1"),
    AvailabilityZone=st.sampled_from(["us-east-1a", "us-east-1b"])), max_size=3))


@given(SUBNETS, reply(Vpcs=st.lists(obj(VpcId=st.just("vpc-1")), max_size=2)),
       reply(InstanceTypeOfferings=st.lists(obj(Location=st.sampled_from(
           ["us-east-1a", "us-east-1b"])), max_size=3)), st.booleans())
def test_subnets(subnets, vpcs, offerings, configured):
    aws = answering(DescribeSubnets=subnets, DescribeVpcs=vpcs,
                    DescribeInstanceTypeOfferings=offerings)
    aws.settings.aws_subnet_id = None
    opts = Options({"subnet_ids": ["subnet-1"]} if configured else {})
    outcome = bounded(lambda: aws._subnets(REGION, "g5.xlarge", opts, []),
                      TYPED + (SkipRegion,))
    if outcome.error is None:
        ids, vpc = outcome.value
        assert ids and all(i.startswith("subnet-") for i in ids) and vpc == "vpc-1"
