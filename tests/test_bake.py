"""`ephemera bake`: baked AMIs made, listed and pruned against moto, the plan picking a
matching one, launches from it, and what the baked disk keeps of the bake run (nothing
that powers a new instance off at the bake run's expiry)."""

from __future__ import annotations

import base64
import json
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from tests.fixtures.standin_targets import end_vm_processes
from tests.runlib import ephemera

BAKE_REGION = "us-west-2"


def _ec2(region: str = BAKE_REGION):
    import boto3

    return boto3.client("ec2", region_name=region)


def _bake(target, *extra: str):
    done = ephemera("bake", str(target.job), "--catalog", target.args[1], "--json", *extra,
                    env=target.env, timeout=240)
    result = json.loads(done.stdout) if done.stdout.strip() else {}
    # The "VM" is this machine: what stopping and terminating it would end, the test ends
    # (else the bake's server keeps the port the next aws test's server needs).
    if result.get("run_id"):
        end_vm_processes(result["run_id"])
    assert done.returncode == 0, done.stderr[-3000:]
    return result


def _snapshot_ids(region: str = BAKE_REGION) -> set[str]:
    return {s["SnapshotId"] for s in _ec2(region).describe_snapshots(OwnerIds=["self"])["Snapshots"]}


@pytest.mark.timeout(600)
def test_bake_makes_lists_and_prunes_images_and_snapshots(aws_target):
    from ephemera_providers.aws_bake import BAKED_TAG, KEY_TAG

    first = _bake(aws_target)
    assert first["status"] == "passed", first["message"]
    image = first["image"]
    ec2 = _ec2()
    raw = ec2.describe_images(ImageIds=[image["id"]])["Images"][0]
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags[KEY_TAG] == image["key"] and tags[BAKED_TAG] == "complete"
    assert tags["ephemera:baked-from"] == first["run_id"] and "ephemera:run-id" not in tags
    snapshots = [d["Ebs"]["SnapshotId"] for d in raw["BlockDeviceMappings"]]
    assert snapshots and snapshots == image["snapshots"]
    for snap in ec2.describe_snapshots(SnapshotIds=snapshots)["Snapshots"]:
        assert {t["Key"]: t["Value"] for t in snap["Tags"]}[KEY_TAG] == image["key"]
    # The bake run's instance was stopped, imaged and then terminated like any run's.
    assert aws_target.leftovers(first["run_id"]) == []
    states = [i["State"]["Name"] for r in ec2.describe_instances()["Reservations"]
              for i in r["Instances"]]
    assert states and set(states) <= {"terminated", "shutting-down"}

    second = _bake(aws_target)["image"]
    assert second["key"] == image["key"] and second["id"] != image["id"]
    listed = ephemera("bake", "--list", "--region", BAKE_REGION, "--json", env=aws_target.env)
    assert listed.returncode == 0, listed.stderr
    assert [i["id"] for i in json.loads(listed.stdout)["baked"]] == [second["id"], image["id"]]

    # --prune keeps the newest per key: the older image and its snapshots go.
    pruned = ephemera("bake", "--prune", "--region", BAKE_REGION, "--json", env=aws_target.env)
    assert pruned.returncode == 0, pruned.stderr
    assert [i["id"] for i in json.loads(pruned.stdout)["removed"]] == [image["id"]]
    assert ec2.describe_images(Owners=["self"])["Images"][0]["ImageId"] == second["id"]
    assert not set(image["snapshots"]) & _snapshot_ids()
    assert set(second["snapshots"]) <= _snapshot_ids()

    everything = ephemera("bake", "--prune", "--all", "--region", BAKE_REGION, env=aws_target.env)
    assert everything.returncode == 0, everything.stderr
    assert f"removed {second['id']}" in everything.stdout
    assert ec2.describe_images(Owners=["self"])["Images"] == []
    assert not set(second["snapshots"]) & _snapshot_ids()


def test_bake_refuses_other_providers_and_a_missing_job(tmp_path):
    from tests.runlib import run_env, write_job

    job = write_job(tmp_path, "local-cpu-smoke.yaml", {"name": "not-aws"})
    env = run_env(EPHEMERA_CONFIG=str(tmp_path / "none.toml"))
    done = ephemera("bake", str(job), env=env)
    assert done.returncode == 2 and "aws provider only" in done.stderr
    done = ephemera("bake", env=env)
    assert done.returncode == 2 and "give a job file" in done.stderr


# ------------------------------------------------------------------- plan and launch


def _job():
    from ephemera.spec.job import Job

    return Job.model_validate({
        "name": "baked", "image": "vllm/vllm-openai:v0.11.0",
        "model": {"id": "ephemera/tiny-llama", "precision": "fp16", "max_model_len": 256},
        "suite": {"command": "true"}, "resources": {"provider": "aws", "regions": ["us-east-1"]},
        "timeout": "20m"})


def _baked_ami(region: str, key: str, baked: str = "complete") -> str:
    """A baked-looking AMI in moto: an image of a stopped instance, tagged with ``key``."""
    from ephemera_providers.aws_bake import BAKED_TAG, KEY_TAG

    ec2 = _ec2(region)
    base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=base, MinCount=1, MaxCount=1,
                                 InstanceType="t3.micro")["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[instance])
    ami = ec2.create_image(InstanceId=instance, Name=f"baked-{key[:8]}-{baked}", TagSpecifications=[
        {"ResourceType": "image", "Tags": [{"Key": KEY_TAG, "Value": key},
                                           {"Key": BAKED_TAG, "Value": baked}]}])["ImageId"]
    ec2.terminate_instances(InstanceIds=[instance])
    return ami


def test_plan_picks_the_matching_baked_image_and_ignores_others(aws_env, tmp_path):
    from ephemera_providers.aws_bake import bake_key

    from ephemera.sizing.plan import plan_job

    job = _job()
    before = plan_job(job)
    assert before.machine_image is None
    offer = before.offer
    key = bake_key(job, offer.gpu)
    matching = _baked_ami(offer.region, key)
    _baked_ami(offer.region, bake_key(job, "H100"))                  # another GPU type
    _baked_ami(offer.region, key, baked="pending")                   # never finished
    other_job = job.model_copy(update={"image": "vllm/vllm-openai:v0.10.0"})
    _baked_ami(offer.region, bake_key(other_job, offer.gpu))         # another vLLM
    plan = plan_job(job)
    assert plan.machine_image is not None and plan.machine_image["id"] == matching
    assert any(matching in note for note in plan.notes)
    assert plan.to_dict()["machine_image"]["id"] == matching
    assert plan_job(other_job).machine_image["id"] != matching
    # A job that names its own AMI keeps it.
    own = job.model_copy(update={"resources": job.resources.model_copy(update={
        "aws": job.resources.aws.model_copy(update={"ami": "ami-12345678"})})})
    assert plan_job(own).machine_image is None
    # A catalog file plans offline: no lookup.
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,"
                       f"memory_gib,price_per_hour\naws,{offer.instance_type},{offer.region},"
                       f"{offer.gpu},1,{offer.gpu_memory_gib},4,16,1.0\n")
    assert plan_job(job, catalog=catalog).machine_image is None


def test_plan_shows_the_baked_image(aws_env, tmp_path):
    from ephemera_providers.aws_bake import bake_key
    from ruamel.yaml import YAML

    from ephemera.sizing.plan import plan_job
    from tests.runlib import run_env

    job = _job()
    offer = plan_job(job).offer
    ami = _baked_ami(offer.region, bake_key(job, offer.gpu))
    path = tmp_path / "baked.yaml"
    with path.open("w") as fh:
        YAML().dump(job.model_dump(mode="json", exclude_defaults=True), fh)
    done = ephemera("plan", str(path), env=run_env(EPHEMERA_CONFIG=str(tmp_path / "none.toml")))
    assert done.returncode == 0, done.stderr
    assert f"boots the baked image {ami}" in " ".join(done.stdout.split())


def test_a_launch_from_a_baked_image_gets_a_fresh_expiry_and_an_initialization_rate(contract_aws):
    from ephemera_providers.aws_bake import INIT_RATE_MIB_S

    from tests.fixtures.moto_server import count_calls

    provider = contract_aws.provider
    bake_spec = contract_aws.make_spec("bake-run", expires_in_seconds=60)
    baked_instance = provider.launch(bake_spec)
    ami = _baked_ami("us-east-1", "k" * 24)
    calls = count_calls(provider, "us-east-1", "RunInstances")
    spec = contract_aws.make_spec("after-bake", expires_in_seconds=3600,
                                  options={"aws": {"ssh_user": contract_aws.sshd.user},
                                           "machine_image": {"id": ami, "region": "us-east-1"}})
    instance = provider.launch(spec)
    try:
        assert instance.data["ami"] == ami and instance.data["baked"] == "1"
        body = calls[-1]
        assert body["ImageId"] == ami
        assert str(body["BlockDeviceMapping.1.Ebs.VolumeInitializationRate"]) == str(INIT_RATE_MIB_S)
        ec2 = _ec2("us-east-1")
        user_data = base64.b64decode(ec2.describe_instance_attribute(
            InstanceId=instance.id, Attribute="userData")["UserData"]["Value"]).decode()
        assert f"EXPIRES_AT={int(spec.expires_at.timestamp())}" in user_data
        assert f"EXPIRES_AT={int(bake_spec.expires_at.timestamp())}" not in user_data
        # The image is pulled from boot on.
        assert "systemd-run --unit ephemera-boot-pull" in user_data
        assert "docker pull vllm/vllm-openai:latest" in user_data
        # In another region the baked id means nothing: the usual AMI is used there.
        from ephemera_providers.aws_common import Options
        from ephemera_providers.aws_resources import baked_image_id

        assert baked_image_id(Options(spec.options), "us-west-2") is None
    finally:
        provider.terminate(instance)
        provider.terminate(baked_instance)


# ------------------------------------------------------------------- the baked disk


FAKE_SYSTEMCTL = """#!/bin/sh
# Records the call; "enable"/"disable" link the unit as systemd would.
echo "$@" >> /tmp/systemctl.calls
wants=/etc/systemd/system/multi-user.target.wants
case "$1" in
  enable) mkdir -p $wants; for u in "$@"; do case "$u" in *.service)
      ln -sf /etc/systemd/system/$u $wants/$u;; esac; done;;
  disable) for u in "$@"; do rm -f $wants/$u; done;;
esac
"""


def test_the_baked_disk_keeps_no_dead_man_switch_key_or_run_state(docker_engine, cpu_image,
                                                                  tmp_path):
    """The bake run's user-data, then its clean-up, in a root container standing in for
    the instance's disk: what would survive into the AMI is checked file by file."""
    from ephemera_providers.aws_bake import cleanup_script
    from ephemera_providers.aws_userdata import BOOT_DIR, DEADMAN_SCRIPT, DEADMAN_UNIT, user_data

    expires = datetime.now(UTC) + timedelta(hours=2)
    bake_key_line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBAKEBAKEBAKEBAKEBAKEBAKEBAKEBAKEBAKEBAKE ephemera"
    other_line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOTHEROTHEROTHEROTHEROTHEROTHEROTHEROTHE admin"
    (tmp_path / "user-data").write_text(user_data("bake-1", expires, "root", "example/image:1"))
    (tmp_path / "cleanup").write_text(cleanup_script("root", bake_key_line, "/root/runs/bake-1",
                                                     "ephemera-bake-1"))
    (tmp_path / "systemctl").write_text(FAKE_SYSTEMCTL)
    for name in ("shutdown", "docker", "systemd-run", "cloud-init"):
        (tmp_path / name).write_text(f"#!/bin/sh\necho {name} \"$@\" >> /tmp/{name}.calls\n")
    script = f"""set -e
mkdir -p /fake && cp /in/systemctl /in/shutdown /in/docker /in/systemd-run /in/cloud-init /fake/
chmod +x /fake/*
export PATH=/fake:$PATH
mkdir -p /root/.ssh /root/runs/bake-1/model
printf '%s\\n' '{bake_key_line}' '{other_line}' > /root/.ssh/authorized_keys
bash /in/user-data > /dev/null 2>&1 || true
echo "before: $(ls {DEADMAN_UNIT} {DEADMAN_SCRIPT} /etc/systemd/system/multi-user.target.wants/ {BOOT_DIR} | tr '\\n' ' ')"
grep -c {int(expires.timestamp())} {DEADMAN_SCRIPT} | sed 's/^/deadman-expiry-lines: /'
bash /in/cleanup
for f in {DEADMAN_UNIT} {DEADMAN_SCRIPT} /etc/systemd/system/multi-user.target.wants/ephemera-deadman.service {BOOT_DIR} /root/runs/bake-1; do
  if [ -e "$f" ] || [ -L "$f" ]; then echo "LEFT $f"; fi
done
echo "keys: $(cat /root/.ssh/authorized_keys | tr '\\n' '|')"
echo "calls: $(cat /tmp/*.calls | tr '\\n' '|')"
"""
    done = subprocess.run(["docker", "run", "--rm", "--user", "0", "-v", f"{tmp_path}:/in:ro",
                           "--entrypoint", "bash", cpu_image, "-c", script],
                          capture_output=True, text=True, timeout=120)
    out = done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    # The bake run's user-data did install its switch with its expiry...
    assert "ephemera-deadman.service" in out.split("before:")[1]
    assert "deadman-expiry-lines: 1" in out
    # ...and after the clean-up none of it, the run's key or its directory is left.
    assert "ephemera-bake-clean" in out
    assert "LEFT" not in out, out
    keys = out.split("keys: ")[1].splitlines()[0]
    assert "BAKEBAKE" not in keys and "OTHEROTHER" in keys
    calls = out.split("calls: ")[1]
    assert "disable ephemera-deadman.service" in calls and "clean --logs" in calls
    assert "docker rm -f ephemera-bake-1" in calls
