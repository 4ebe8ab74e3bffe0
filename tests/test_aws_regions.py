"""Where teardown, `down` and `reap` look: every region a run tried (recorded on disk
before each attempt, readable by another process), every enabled region for the
reaper, and never a partial answer that looks complete."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import boto3
import pytest

from ephemera.errors import InfraError
from tests.fixtures.moto_server import count_calls, inject

pytestmark = pytest.mark.timeout(180)


class Died(BaseException):
    """Stands for SIGKILL: nothing after it runs in the launching process."""


def fresh_provider():
    """A provider with nothing in memory, as in a later `ephemera down` or `reap`."""
    from ephemera_providers.aws import AWSProvider

    from ephemera.spec.settings import reset_settings

    reset_settings()
    return AWSProvider(retry_base_seconds=0.01, retry_max_seconds=0.05)


def spec_in(aws, run_id, region, **changes):
    spec = aws.make_spec(run_id, **changes)
    return replace(spec, offer=replace(spec.offer, region=region))


def record_file(tmp_path, run_id):
    return tmp_path / "state" / "aws" / f"{run_id}.json"


def live(region):
    ec2 = boto3.client("ec2", region_name=region)
    return [i["InstanceId"] for r in ec2.describe_instances(Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]
        for i in r["Instances"]]


def test_region_is_recorded_before_run_instances(contract_aws, tmp_path):
    aws = contract_aws
    seen = []

    def look(n, body):
        seen.append(json.loads(record_file(tmp_path, "run-rec").read_text())["regions"])

    inject(aws.provider, "us-west-2", "RunInstances", look)
    inst = aws.provider.launch(spec_in(aws, "run-rec", "us-west-2"))
    assert seen == [["us-west-2"]]
    assert inst.data["regions"] == "us-west-2"
    record = json.loads(record_file(tmp_path, "run-rec").read_text())
    assert record["options"]["subnet_ids"] == [] and "profile" in record["options"]


def test_a_later_process_finds_and_tears_down_a_launch_that_died(contract_aws):
    """SIGKILL right after RunInstances in a region the settings do not name: the state
    file has no instance, yet `down` must find and end it there."""
    from ephemera.lifecycle.teardown import teardown_run

    aws = contract_aws

    def die(**_):
        raise Died()

    aws.provider.client("ec2", "us-west-2").meta.events.register("after-call.ec2.RunInstances", die)
    with pytest.raises(Died):
        aws.provider.launch(spec_in(aws, "run-died", "us-west-2"))
    assert len(live("us-west-2")) == 1
    later = fresh_provider()
    assert later.default_region() == "us-east-1" and later.settings.aws_regions == []
    found = later.find({"run-id": "run-died"})
    assert [i.region for i in found if not i.data.get("kind")] == ["us-west-2"]
    result = teardown_run(later, "run-died", None, timeout=60, log=lambda m: None)
    assert result.verified, result.problems
    assert live("us-west-2") == []


def test_find_that_cannot_search_a_region_raises_with_what_it_found(contract_aws):
    from ephemera_providers.aws_errors import IncompleteSearchError

    aws = contract_aws
    east = aws.provider.launch(aws.make_spec("run-part", options={
        "regions": ["us-east-1", "us-west-2"]}))
    # The run also tried us-west-2 (say, after a capacity error there).
    from ephemera_providers import aws_regions

    aws_regions.add_region(aws.provider.settings.state_dir, "run-part", "us-west-2",
                           expires_at=datetime.now(UTC) + timedelta(hours=1), options={})
    inject(aws.provider, "us-west-2", "DescribeInstances", lambda n, body: "UnauthorizedOperation")
    with pytest.raises(IncompleteSearchError) as err:
        aws.provider.find({"run-id": "run-part"})
    assert [i.id for i in err.value.found] == [east.id]
    assert "us-west-2" in str(err.value) and "UnauthorizedOperation" in str(err.value)
    assert isinstance(err.value, InfraError)


def test_reap_searches_every_enabled_region_and_goes_past_a_failing_one(contract_aws, tmp_path):
    from ephemera_providers.aws_errors import IncompleteSearchError

    from ephemera.provider import make_labels

    aws = contract_aws
    past = datetime.now(UTC) - timedelta(minutes=5)
    spec = spec_in(aws, "run-far", "us-east-2", expires_at=past,
                   labels=make_labels("run-far", "contract", "tester", past))
    far = aws.provider.launch(spec)
    record_file(tmp_path, "run-far").unlink()  # launched from another machine
    reaper = fresh_provider()
    listed = count_calls(reaper, "us-east-1", "DescribeRegions")
    found = reaper.find({})
    assert far.id in [i.id for i in found]
    assert len(listed) == 1
    # One region that cannot be searched does not hide the others.
    reaper = fresh_provider()
    inject(reaper, "ap-south-1", "DescribeInstances", lambda n, body: "UnauthorizedOperation")
    with pytest.raises(IncompleteSearchError) as err:
        reaper.find({})
    assert far.id in [i.id for i in err.value.found]
    assert err.value.failures and err.value.failures[0].startswith("ap-south-1")


def test_reap_with_configured_regions_searches_those_and_the_recorded_ones(
        contract_aws, monkeypatch):
    aws = contract_aws
    far = aws.provider.launch(spec_in(aws, "run-rec2", "us-east-2"))
    monkeypatch.setenv("EPHEMERA_AWS_REGIONS", '["us-west-2"]')
    reaper = fresh_provider()
    assert reaper.reap_regions([]) == ["us-west-2", "us-east-2"]
    listed = count_calls(reaper, "us-west-2", "DescribeRegions")
    assert far.id in [i.id for i in reaper.find({})]
    assert listed == []


def test_a_region_that_cannot_be_recorded_is_not_launched_in(contract_aws, tmp_path):
    aws = contract_aws
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "aws").write_text("not a directory")
    runs = count_calls(aws.provider, "us-west-2", "RunInstances")
    with pytest.raises(InfraError, match="could not record that run run-norec tries us-west-2"):
        aws.provider.launch(spec_in(aws, "run-norec", "us-west-2"))
    assert runs == []
    # The settings' own region is searched anyway: launching there is safe.
    inst = aws.provider.launch(aws.make_spec("run-norec2"))
    assert inst.region == "us-east-1"


def test_complete_reap_prunes_records_of_expired_runs(contract_aws, tmp_path):
    from ephemera_providers import aws_regions

    aws = contract_aws
    state = aws.provider.settings.state_dir
    long_ago = datetime.now(UTC) - timedelta(days=2)
    aws_regions.add_region(state, "run-old-gone", "us-west-2", expires_at=long_ago, options={})
    aws_regions.add_region(state, "run-fresh", "us-west-2",
                           expires_at=datetime.now(UTC) + timedelta(hours=1), options={})
    fresh_provider().find({}, regions=None)
    assert not record_file(tmp_path, "run-old-gone").exists()
    assert record_file(tmp_path, "run-fresh").exists()
    # A search for one run never prunes.
    aws_regions.add_region(state, "run-old-gone", "us-west-2", expires_at=long_ago, options={})
    fresh_provider().find({"run-id": "run-old-gone"})
    assert record_file(tmp_path, "run-old-gone").exists()


def test_a_run_launched_with_another_profile_is_not_searched_as_if_complete(
        contract_aws, tmp_path, monkeypatch):
    """`down` with other credentials than the launch's may look at another account:
    its search fails with what to do, instead of an empty list."""
    from ephemera_providers.aws_errors import IncompleteSearchError

    aws = contract_aws
    inst = aws.provider.launch(aws.make_spec("run-prof"))
    record = json.loads(record_file(tmp_path, "run-prof").read_text())
    assert record["options"]["profile"] == ""
    config = tmp_path / "aws-config"
    config.write_text("[profile other]\nregion = us-east-1\n")
    credentials = tmp_path / "aws-credentials"
    credentials.write_text("[other]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "other")
    with pytest.raises(IncompleteSearchError, match="search again with AWS_PROFILE unset") as err:
        fresh_provider().find({"run-id": "run-prof"})
    assert [i.id for i in err.value.found if not i.data.get("kind")] == [inst.id]
    monkeypatch.delenv("AWS_PROFILE")
    assert inst.id in [i.id for i in fresh_provider().find({"run-id": "run-prof"})]
