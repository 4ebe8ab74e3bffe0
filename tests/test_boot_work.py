"""The weights download on a machine's host, and the work an aws instance starts at boot.

- ssh: the download runs on the host (huggingface_hub from EPHEMERA_HUB_PYTHON, a gated
  model's token over SSH) from a loopback hub into the host's hub cache, beside the image
  phase (their start offsets overlap); the job's container gets HF_HOME.
- aws on moto: the test plays the instance's boot. Before SSH lets the run in, it runs
  the boot-work section of the user-data moto holds (the dead-man part is not run) on
  this machine: the image pull from a loopback registry and the weights download from
  a loopback hub start there, and the run joins them instead of starting its own. When
  the boot work failed, the run does the work itself.

The server is the stand-in (tests/standin): vLLM is not the point here.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ephemera_providers.aws_userdata import BOOT_WORK_MARK

from tests.fixtures.common import missing_component
from tests.fixtures.standin_targets import _env, _job, aws_leftovers, end_vm_processes
from tests.runlib import KeyInstaller, RunProcess, edit_job, processes_of
from tests.test_pull_progress import (  # noqa: F401
    _forget,
    _through,
    pushed_image,
    registry,
    slow_registry,
)
from tests.test_weights import TOKEN, _files

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub_python(docker_login_user) -> str:
    """A Python the login user runs, with this checkout's huggingface_hub."""
    found = docker_login_user.python_with("huggingface_hub")
    if found is None:
        missing_component(f"no Python with huggingface_hub that {docker_login_user.server.user} "
                          f"can run (this checkout's is Python {sys.version_info[:2]})")
    return found


def _hub_job(job: Path, repo: str, home: str, **top) -> None:
    """The job serves ``repo`` from the hub; the suite checks its files under ``home`` and
    the stand-in server prints its HF_HOME."""
    snapshots = f"{home}/hub/models--{repo.replace('/', '--')}/snapshots"

    def change(data: dict) -> None:
        data["model"]["id"] = repo
        data["server"]["env"]["STANDIN_ECHO_ENV"] = "HF_HOME"
        data["suite"]["command"] = f"ls {snapshots}/*/config.json && echo weights-found"
        data.update(top)

    edit_job(job, change)


def _phase(result: dict, name: str) -> tuple[float, float]:
    row = next(p for p in result["phases"] if p["name"] == name)
    return row["start"], row["start"] + row["seconds"]


def _served(hub, repo: str, name: str) -> int:
    """GETs of a file by the snapshot's commit: the downloads (the plan reads the model's
    config and safetensors header at the branch's head)."""
    path = f"/{repo}/resolve/{hub.repos[repo].commit}/{name}"
    return len([r for r in hub.requests if r[1] == "GET" and r[2] == path])


@pytest.mark.timeout(240)
def test_ssh_downloads_the_weights_on_the_host_beside_the_image(
        ssh_container_target, docker_login_user, loopback_hub, hub_python, tmp_path):
    target = ssh_container_target
    loopback_hub.add("ephemera-test/ssh-hub", _files(), token=TOKEN, delay=1.0)
    cache = docker_login_user.workroot("hub-cache")
    _hub_job(target.job, "ephemera-test/ssh-hub", cache, cache={"weights": cache},
             env={"HF_TOKEN": TOKEN})
    env = {**target.env, "HF_ENDPOINT": loopback_hub.url, "HF_TOKEN": TOKEN,
           "EPHEMERA_HUB_PYTHON": hub_python}
    run = RunProcess(target.job, env, *target.args)
    try:
        code, result = run.finish(timeout=180)
        assert code == 0, run.stderr[-4000:]
        (w_start, w_end), (i_start, _) = _phase(result, "weights"), _phase(result, "image")
        assert w_start <= i_start < w_end, result["phases"]
        snapshot = f"{cache}/hub/models--ephemera-test--ssh-hub/snapshots/"
        assert f"--model {snapshot}" in result["server_command"]
        assert list(Path(snapshot).glob("*/config.json")), "the weights are not in the host's cache"
        artifacts = Path(result["artifacts_dir"])
        assert "weights-found" in (artifacts / "suite.log").read_text()
        assert f"config HF_HOME={cache}" in (artifacts / "vllm.log").read_text()
        assert _served(loopback_hub, "ephemera-test/ssh-hub", "model.safetensors") == 1
        assert TOKEN not in run.stderr
        assert target.leftovers(result["run_id"]) == []
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------- aws on moto


class BootPlayer(KeyInstaller):
    """Plays the instance's boot for each run: once its instance is in moto, runs the
    user-data's boot-work section here (as root, as cloud-init would), then lets the run
    in over SSH (installs its key). ``path`` goes before the boot's PATH; ``before``
    runs before the boot, ``then`` after it; with ``settle`` (the boot directory) the key
    goes in only once the boot work has ended."""

    def __init__(self, state_dir: Path, authorized: Path, boot_log: Path) -> None:
        super().__init__(state_dir, authorized)
        self.boot_log = boot_log
        self.path = ""
        self.settle = ""
        self.before = self.then = lambda: None
        self.played: list[str] = []
        self.failure = ""

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for pub in self.state_dir.glob("keys/*/*.pub"):
                line = pub.read_text().strip()
                if line and line not in self.installed:
                    try:
                        self.play(pub.parent.name)
                    except Exception as exc:  # noqa: BLE001 - reported by the test
                        self.failure = f"{type(exc).__name__}: {exc}"
                    with self.authorized.open("a") as fh:
                        fh.write(line + "\n")
                    self.installed.append(line)

    def play(self, run_id: str) -> None:
        import boto3

        ec2 = boto3.client("ec2", region_name="us-west-2")
        filters = [{"Name": "tag:ephemera:run-id", "Values": [run_id]}]
        deadline = time.monotonic() + 60
        ids: list[str] = []
        while not ids and time.monotonic() < deadline and not self.stop.is_set():
            ids = [i["InstanceId"] for r in ec2.describe_instances(Filters=filters)["Reservations"]
                   for i in r["Instances"]]
            time.sleep(0.05)
        raw = ec2.describe_instance_attribute(InstanceId=ids[0], Attribute="userData")
        script = base64.b64decode(raw["UserData"]["Value"]).decode()
        boot = "set -u\n" + script.split(BOOT_WORK_MARK, 1)[1]
        self.before()
        env = {**os.environ, "PATH": f"{self.path}:{os.environ['PATH']}" if self.path else os.environ["PATH"]}
        with self.boot_log.open("a") as log:   # a file: the detached tasks keep it open
            subprocess.run(["bash", "-c", boot], env=env, stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, cwd="/", timeout=60, check=True)
        while self.settle and any(not (Path(self.settle) / t / "rc").exists() for t in ("pull", "weights")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the boot work in {self.settle} did not end")
            time.sleep(0.1)
        self.played.append(run_id)
        self.then()


@pytest.fixture
def aws_boot(tmp_path, aws_env, docker_login_user, loopback_hub, hub_python, pushed_image):  # noqa: F811
    """An aws job on the loopback registry's image, whose instance's boot the test plays
    (``player``), with its boot directory in the login user's home."""
    login = docker_login_user
    workroot = login.workroot("boot-aws")
    boot_dir = login.workroot("boot-dir")
    authorized = login.home / ".ssh" / "authorized_keys"
    before = authorized.read_text()
    player = BootPlayer(tmp_path / "state", authorized, tmp_path / "boot.log")
    player.start()
    catalog = tmp_path / "cpu-catalog.csv"
    catalog.write_text("provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,"
                       "price_per_hour\naws,c7i.xlarge,us-west-2,,0,0,4,8,0.1785\n")
    job = _job(tmp_path, "aws", image=pushed_image, python="python3",
               resources={"regions": ["us-west-2"], "aws": {"ssh_user": login.server.user}})
    env = _env(tmp_path, EPHEMERA_SSH_WORKROOT=workroot, EPHEMERA_AWS_BOOT_DIR=boot_dir,
               HF_ENDPOINT=loopback_hub.url, EPHEMERA_HUB_PYTHON=hub_python)
    env.pop("HF_TOKEN", None)
    _forget(pushed_image)
    yield {"job": job, "env": env, "args": ("--catalog", str(catalog)), "player": player,
           "boot_dir": boot_dir, "image": pushed_image, "hub": loopback_hub}
    player.stop.set()
    player.join(timeout=5)
    authorized.write_text(before)
    for pid, _ in processes_of(boot_dir):   # boot work still running: what the VM's end would end
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(workroot, ignore_errors=True)
    shutil.rmtree(boot_dir, ignore_errors=True)
    _forget(pushed_image)


def _run_aws(boot: dict, tmp_path: Path, repo: str) -> tuple[dict, str]:
    _hub_job(boot["job"], repo, f"{boot['boot_dir']}/hf")
    run = RunProcess(boot["job"], boot["env"], *boot["args"])
    try:
        code, result = run.finish(timeout=180)
    finally:
        with contextlib.suppress(AssertionError):
            end_vm_processes(run.run_id())
    assert not boot["player"].failure, boot["player"].failure + (tmp_path / "boot.log").read_text()
    assert code == 0, run.stderr[-4000:] + (tmp_path / "boot.log").read_text()[-2000:]
    assert boot["player"].played == [result["run_id"]]
    assert aws_leftovers(tmp_path, result["run_id"]) == []
    return result, run.stderr


@pytest.mark.timeout(240)
def test_aws_run_joins_the_pull_and_the_download_started_at_boot(aws_boot, slow_registry,  # noqa: F811
                                                                 tmp_path):
    hub = aws_boot["hub"]
    hub.add("ephemera-test/boot-hub", _files(), delay=2.0)   # still downloading at login
    image = _through(slow_registry(2.0), aws_boot["image"])   # still pulling at login
    _forget(image)
    edit_job(aws_boot["job"], lambda data: data.update(image=image))
    try:
        result, stderr = _run_aws(aws_boot, tmp_path, "ephemera-test/boot-hub")
    finally:
        _forget(image)
    assert "image: joined the pull started at boot (done)" in stderr
    assert f"pulling {image}: " in stderr   # the boot pull's progress, read from its log
    assert "weights: joined the download of ephemera-test/boot-hub started at boot (done)" in stderr
    repo = "ephemera-test/boot-hub"
    assert _served(hub, repo, "model.safetensors") == 1
    assert _served(hub, repo, "tokenizer/tokenizer.json") == 1
    snapshot = f"{aws_boot['boot_dir']}/hf/hub/models--ephemera-test--boot-hub/snapshots/"
    assert f"--model {snapshot}" in result["server_command"]
    assert "weights-found" in (Path(result["artifacts_dir"]) / "suite.log").read_text()
    weights = next(p for p in result["phases"] if p["name"] == "weights")
    assert weights["ok"]


@pytest.mark.timeout(240)
def test_aws_run_does_the_work_itself_when_the_boot_work_failed(aws_boot, tmp_path):
    hub, player = aws_boot["hub"], aws_boot["player"]
    repo = hub.add("ephemera-test/late-hub", _files())
    # At boot, docker refuses the pull and the hub refuses the download (the model is
    # gated then); both are fine again by the time the run logs in.
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "docker").write_text("#!/bin/sh\necho 'Error response from daemon: refused' >&2\nexit 1\n")
    (stubs / "docker").chmod(0o755)
    player.path, player.settle = str(stubs), aws_boot["boot_dir"]
    player.before = lambda: setattr(repo, "token", "hf_not_given_to_the_machine")
    player.then = lambda: setattr(repo, "token", None)
    result, stderr = _run_aws(aws_boot, tmp_path, "ephemera-test/late-hub")
    boot_dir = Path(aws_boot["boot_dir"])
    assert (boot_dir / "pull" / "rc").read_text().strip() == "1"
    assert (boot_dir / "weights" / "rc").read_text().strip() == "1"
    assert "image: the pull started at boot failed (exit status 1" in stderr
    assert "weights: the download started at boot failed (exit status 1" in stderr
    assert "downloading here" in stderr
    assert subprocess.run(["docker", "image", "inspect", aws_boot["image"]],
                          capture_output=True, timeout=60).returncode == 0
    assert _served(hub, "ephemera-test/late-hub", "model.safetensors") == 1
    assert "weights-found" in (Path(result["artifacts_dir"]) / "suite.log").read_text()
