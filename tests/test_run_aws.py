"""A full `ephemera run` on the aws provider against moto, with the instance's SSH
address overridden (as a bastion forward would be) to the local sshd. As on the real
GPU AMI, the login user is unprivileged and reaches Docker through the docker group;
the job's image (the built-in CPU image) runs through that Docker. It must end with
nothing left in moto."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from pathlib import Path

import boto3
import pytest

from tests.runlib import (
    KeyInstaller,
    RunProcess,
    processes_of,
    run_env,
    wait_no_processes,
    write_job,
)

pytestmark = [pytest.mark.vllm, pytest.mark.sshd]


def _leftovers(region: str) -> list[str]:
    ec2 = boto3.client("ec2", region_name=region)
    groups = [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]
              if g["GroupName"] != "default"]
    keys = [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"]]
    live = [i["InstanceId"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
            if i["State"]["Name"] != "terminated"]
    return groups + keys + live


@pytest.mark.timeout(600)
def test_aws_job_runs_end_to_end_against_moto(tmp_path, aws_env, docker_engine, cpu_image,
                                              docker_login_user):
    login = docker_login_user
    job = write_job(tmp_path, "local-cpu-smoke.yaml", {
        "name": "aws-cpu-smoke",
        "image": "ephemera/cpu",
        "server": {"launcher": "auto", "python": "python3"},
        "suite": {"command": "cd suites/cpu-smoke && python3 -m pytest -q -p no:cacheprovider "
                             "--junitxml=junit.xml"},
        "resources": {"provider": "aws", "regions": ["us-west-2"],
                      "tags": {"team": "infra"}, "aws": {"ssh_user": login.server.user}},
    })
    state_dir = tmp_path / "state"
    authorized = login.home / ".ssh" / "authorized_keys"
    before = authorized.read_text()
    installer = KeyInstaller(state_dir, authorized)
    installer.start()
    workroot = login.workroot("aws")
    env = run_env(EPHEMERA_STATE_DIR=str(state_dir), EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                  EPHEMERA_ARTIFACTS_DIR=str(tmp_path / "runs"),
                  EPHEMERA_CONFIG=str(tmp_path / "none.toml"), EPHEMERA_SSH_WORKROOT=workroot)
    # This "VM" has no GPU, so the plan is made on a CPU instance type (no --gpus for
    # Docker); everything else is the GPU path.
    catalog = tmp_path / "cpu-catalog.csv"
    catalog.write_text("provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,"
                       "price_per_hour\naws,c7i.xlarge,us-west-2,,0,0,4,8,0.1785\n")
    run = RunProcess(job, env, "--catalog", str(catalog))
    code, result = None, None
    try:
        code, result = run.finish(timeout=560)
    finally:
        installer.stop.set()
        installer.join(timeout=5)
        authorized.write_text(before)
        run_ids = {result["run_id"]} if result else set(re.findall(r"aws-cpu-smoke-\d{8}-\d{6}-\w{4}", run.stderr))
        for run_id in run_ids:
            end_instance_processes(run_id)
        shutil.rmtree(workroot, ignore_errors=True)
    assert code == 0, run.stderr[-4000:]
    assert result["status"] == "passed" and result["provider"] == "aws"
    run_id = result["run_id"]
    artifacts = Path(result["artifacts_dir"])
    assert 'tests="5"' in (artifacts / "junit.xml").read_text()
    # The key pair moto was given is the run's fresh key, the one SSH logged in with.
    assert installer.key_pairs.get(f"ephemera-{run_id}", "").split()[:2] == installer.installed[0].split()[:2]
    # The instance is terminated and its group and key pair are gone, in every region.
    ec2 = boto3.client("ec2", region_name="us-west-2")
    instances = [i for r in ec2.describe_instances(Filters=[
        {"Name": "tag:ephemera:run-id", "Values": [run_id]}])["Reservations"] for i in r["Instances"]]
    assert [i["State"]["Name"] for i in instances] == ["terminated"]
    tags = {t["Key"]: t["Value"] for t in instances[0]["Tags"]}
    assert tags["team"] == "infra" and tags["ephemera:job"] == "aws-cpu-smoke"
    assert _leftovers("us-west-2") == [] and _leftovers("us-east-1") == []


def end_instance_processes(run_id: str) -> None:
    """What terminating the VM does on AWS: end the run's processes. Here the "instance"
    is this machine's sshd, so the test ends them itself (by their process groups)."""
    left = wait_no_processes(run_id, timeout=5)
    for pgid in {os.getpgid(pid) for pid, _ in left if _exists(pid)}:
        if pgid != os.getpgid(0):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
    if wait_no_processes(run_id, timeout=20):
        for pid, _ in processes_of(run_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    import docker

    client = docker.from_env()
    try:
        for container in client.containers.list(all=True, filters={"label": f"dev.ephemera.run-id={run_id}"}):
            container.remove(force=True)
    finally:
        client.close()


def _exists(pid: int) -> bool:
    try:
        os.getpgid(pid)
        return True
    except ProcessLookupError:
        return False
