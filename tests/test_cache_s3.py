"""Caches kept in an S3 prefix (ephemera/lifecycle/cache_store.py and the script the
machine runs, ephemera/builtins/s3_cache.py), against moto.

The script's pieces in this process (moto in memory): the hub cache goes to S3 as its
blobs, refs and a listing of the snapshot symlinks (never the files twice) and comes
back with the symlinks made again, so huggingface_hub then asks the hub for metadata
only; a compile cache comes back only under a manifest exactly like its key's.

End to end: two aws runs on the moto server, the "instance" being this machine's sshd as
an unprivileged user whose own AWS configuration stands for the instance profile, the
job's image the built-in CPU one with the stand-in server, the model on a loopback hub
that serves only the machine (the planner on this side asks another one)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from ephemera.builtins import s3_cache
from ephemera.errors import ConfigError
from ephemera.lifecycle import caches
from ephemera.lifecycle.weights import download
from ephemera.spec.jobfile import load_job
from tests.fixtures.loopback_hub import LoopbackHub, _handler
from tests.fixtures.standin_targets import end_vm_processes
from tests.runlib import RunProcess, ephemera, run_env
from tests.test_weights import _files

BUCKET = "ephemera-caches"
REGION = "us-west-2"
FOLDER = "models--org--tiny"


# ---------------------------------------------------------------------- the script
@pytest.fixture
def s3(monkeypatch):
    import boto3
    from moto import mock_aws

    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    with mock_aws():
        client = boto3.client("s3", region_name=REGION)
        client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield client


def _keys(client, prefix: str) -> dict[str, int]:
    return {k: size for k, (size, _) in s3_cache.listed(client, BUCKET, prefix).items()}


def _deadline() -> float:
    return time.monotonic() + 60


def _resolve_gets(hub: LoopbackHub) -> int:
    return len([r for r in hub.requests if r[1] == "GET" and "/resolve/" in r[2]])


def test_the_hub_cache_goes_to_s3_without_its_snapshot_files_and_comes_back(loopback_hub, s3, tmp_path):
    files = _files(size=200 * 1024)
    loopback_hub.add("org/tiny", files)
    url = f"s3://{BUCKET}/team/hub-cache"
    first = Path(download("org/tiny", None, tmp_path / "a", token=None, endpoint=loopback_hub.url))

    saved = s3_cache.save_hub(s3, url, tmp_path / "a", FOLDER, _deadline())
    assert saved["state"] == "saved" and saved["files"] == 3 + 1 + 1, saved   # blobs, ref, listing
    stored = _keys(s3, f"team/hub-cache/hub/{FOLDER}")
    blobs = {k for k in stored if k.startswith("blobs/")}
    assert len(blobs) == 3 and "refs/main" in stored and s3_cache.LISTING in stored, stored
    assert not [k for k in stored if k.startswith("snapshots/")], stored
    # Each file's bytes once: the blobs hold exactly the model's files, nothing doubled.
    assert sum(stored[k] for k in blobs) == sum(len(v) for v in files.values())
    again = s3_cache.save_hub(s3, url, tmp_path / "a", FOLDER, _deadline())
    assert (again["files"], again["skipped"]) == (0, 4), again

    restored = s3_cache.restore_hub(s3, url, tmp_path / "b", FOLDER, _deadline())
    assert restored["state"] == "restored" and restored["links"] == 3, restored
    snapshot = tmp_path / "b" / FOLDER / "snapshots" / first.name
    for name, data in files.items():
        assert (snapshot / name).is_symlink() and (snapshot / name).read_bytes() == data
    gets = _resolve_gets(loopback_hub)
    second = download("org/tiny", None, tmp_path / "b", token=None, endpoint=loopback_hub.url)
    assert second == str(snapshot)
    assert _resolve_gets(loopback_hub) == gets   # metadata only: every file was there
    assert s3_cache.restore_hub(s3, url, tmp_path / "c", "models--org--other",
                                _deadline())["state"] == "absent"


def _compile_dir(root: Path, vllm: str) -> tuple[str, str]:
    fields = {"model": "/m", "revision": "", "vllm": vllm, "gpu": "L4", "args": {}}
    key, manifest = caches.cache_key(fields), caches.manifest_text(fields)
    directory = root / key
    (directory / "inductor" / "ab").mkdir(parents=True)
    (directory / "vllm").mkdir()
    (directory / "inductor" / "ab" / "kernel.py").write_text("compiled = 1\n")
    (directory / "vllm" / "graph.bin").write_bytes(os.urandom(3000))
    (directory / caches.MANIFEST).write_text(manifest)
    return key, manifest


def test_a_compile_cache_comes_back_only_under_its_own_manifest(s3, tmp_path):
    url = f"s3://{BUCKET}/compile"
    key, manifest = _compile_dir(tmp_path / "a", "0.32.0")
    saved = s3_cache.save_compile(s3, url, tmp_path / "a", key, _deadline())
    assert saved["state"] == "saved" and saved["files"] == 3, saved
    assert set(_keys(s3, f"compile/{key}")) == {"inductor/ab/kernel.py", "vllm/graph.bin", caches.MANIFEST}
    assert s3_cache.save_compile(s3, url, tmp_path / "a", key, _deadline())["files"] == 0

    restored = s3_cache.restore_compile(s3, url, tmp_path / "b", key, manifest, _deadline())
    assert restored["state"] == "restored" and restored["files"] == 2, restored
    for name in ("inductor/ab/kernel.py", "vllm/graph.bin", caches.MANIFEST):
        assert (tmp_path / "b" / key / name).read_bytes() == (tmp_path / "a" / key / name).read_bytes()

    # The same key's directory under another vLLM's manifest, or a corrupt one: not restored.
    other = caches.manifest_text({"model": "/m", "revision": "", "vllm": "0.33.0", "gpu": "L4", "args": {}})
    for stored in (other, "{corrupt"):
        s3.put_object(Bucket=BUCKET, Key=f"compile/{key}/{caches.MANIFEST}", Body=stored.encode())
        found = s3_cache.restore_compile(s3, url, tmp_path / "c", key, manifest, _deadline())
        assert found["state"] == "discarded" and not (tmp_path / "c").exists(), found
    assert s3_cache.restore_compile(s3, url, tmp_path / "c", "0" * 20, manifest,
                                    _deadline())["state"] == "absent"
    # A local directory whose manifest is another key's is never saved under this one.
    (tmp_path / "a" / key / caches.MANIFEST).write_text(other)
    assert s3_cache.save_compile(s3, url, tmp_path / "a", key, _deadline())["state"] == "foreign"


def test_the_script_says_when_it_failed(s3, tmp_path, capsys):
    code = s3_cache.main(["restore-hub", "s3://no-such-bucket/x", str(tmp_path), FOLDER])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 1 and line.startswith(s3_cache.MARK)
    assert json.loads(line[len(s3_cache.MARK):])["state"] == "failed"


# ---------------------------------------------------------------------- config errors
def test_a_bad_s3_location_names_the_field_and_line(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: s3\nimage: host\nmodel:\n  id: org/tiny\nsuite:\n  command: 'true'\n"
                   "cache:\n  weights: s3://Not_A_Bucket/x\n")
    with pytest.raises(ConfigError) as err:
        load_job(job)
    assert f"{job}:8:12: cache.weights: 's3://Not_A_Bucket/x' is not an S3 location" in str(err.value)


def test_an_s3_cache_on_aws_needs_the_instance_profile(tmp_path):
    from ephemera_providers.aws import AWSProvider

    from ephemera.provider import LaunchSpec, Offer
    from ephemera.spec.settings import Settings

    offer = Offer(provider="aws", instance_type="g6.xlarge", region=REGION, gpu="L4", gpu_count=1,
                  gpu_memory_gib=24.0, vcpus=4, memory_gib=16, price_per_hour=0.8)
    spec = LaunchSpec(run_id="r-1", job_name="j", offer=offer, image="img", labels={},
                      expires_at=datetime.now(UTC),
                      options={"s3_caches": {"cache.compile": f"s3://{BUCKET}/c"}})
    provider = AWSProvider(Settings(state_dir=tmp_path))
    with pytest.raises(ConfigError) as err:
        provider.launch(spec)
    assert "cache.compile" in str(err.value) and "aws_instance_profile" in str(err.value)


def test_an_s3_cache_is_refused_where_no_machine_keeps_it(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("name: s3-local\nmodel:\n  id: ephemera/tiny-llama\nimage: host\nsuite:\n  command: 'true'\n"
                   f"cache:\n  compile: s3://{BUCKET}/c\nresources:\n  provider: local\n")
    done = ephemera("run", str(job), env=run_env(EPHEMERA_STATE_DIR=str(tmp_path / "state")),
                    timeout=120)
    assert done.returncode != 0 and "cache.compile: an s3:// location" in done.stderr, done.stderr


# ---------------------------------------------------------------------- end to end
@contextmanager
def _machine_hub():
    """A loopback hub only the machine talks to (the planner here asks another)."""
    hub = LoopbackHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def _login_aws_config(home: Path, endpoint: str):
    """The login user's own AWS configuration: what an instance profile gives a VM."""
    user = pwd.getpwnam(home.owner())
    aws = home / ".aws"
    aws.mkdir(exist_ok=True)
    (aws / "config").write_text(f"[default]\nregion = {REGION}\nendpoint_url = {endpoint}\n"
                                "aws_access_key_id = instance\naws_secret_access_key = instance\n")
    for path in (aws, aws / "config"):
        os.chown(path, user.pw_uid, user.pw_gid)
    try:
        yield
    finally:
        shutil.rmtree(aws, ignore_errors=True)


def _aws_job(target, machine_hub: str) -> str:
    yaml = YAML()
    data = yaml.load(target.job.read_text())
    workroot = target.env["EPHEMERA_SSH_WORKROOT"]
    compile_dirs = f"{workroot}/.cache/compile/*/vllm"
    data["image"] = "ephemera/cpu"
    data["server"]["python"] = "python3"
    data["model"]["id"] = "ephemera-test/tiny-hub"
    data["env"] = {"HF_ENDPOINT": machine_hub}
    data["cache"] = {"weights": f"s3://{BUCKET}/hub-cache", "compile": f"s3://{BUCKET}/compile-cache"}
    # The suite shows what it found of the compile cache, then "compiles" into it.
    data["suite"]["command"] = (f"for d in {compile_dirs}; do cat $d/graph.bin 2>/dev/null "
                                f"|| echo compile-cache-empty; echo graph-of-run-1 > $d/graph.bin; done")
    with target.job.open("w") as fh:
        yaml.dump(data, fh)
    return workroot


def _run(target, env: dict[str, str]) -> tuple[dict, str]:
    run = RunProcess(target.job, env, *target.args)
    try:
        code, result = run.finish(timeout=150)
    finally:
        end_vm_processes(run.run_id())
    assert code == 0 and result is not None, run.stderr[-4000:]
    return result, (Path(result["artifacts_dir"]) / "suite.log").read_text()


@pytest.mark.timeout(300)
def test_two_aws_runs_keep_weights_and_compile_caches_in_s3(aws_target, cpu_image, loopback_hub,
                                                             docker_login_user, monkeypatch):
    import boto3
    from moto.ec2.models.iam_instance_profile import IamInstanceProfileAssociationBackend as Assoc

    # The instance profile given at launch (moto forgets it once the instance is gone).
    associated: list[tuple[str, str | None]] = []
    original = Assoc.associate_iam_instance_profile

    def associate(self, instance_id, iam_instance_profile_name=None, iam_instance_profile_arn=None):
        associated.append((instance_id, iam_instance_profile_name or iam_instance_profile_arn))
        return original(self, instance_id, iam_instance_profile_name, iam_instance_profile_arn)

    monkeypatch.setattr(Assoc, "associate_iam_instance_profile", associate)
    # Nothing is installed on the "instance": a Python with the checkout's packages.
    hub_python = docker_login_user.python_with("boto3", "huggingface_hub")
    assert hub_python, f"{docker_login_user.server.user} can run no Python {sys.version_info[:2]} " \
                       "with boto3 and huggingface_hub"

    client = boto3.client("s3", region_name=REGION)
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
    iam = boto3.client("iam", region_name="us-east-1")
    iam.create_instance_profile(InstanceProfileName="ephemera-cache")
    files = _files(size=512 * 1024)
    loopback_hub.add("ephemera-test/tiny-hub", files)          # for the planner, here
    with _machine_hub() as machine_hub, \
            _login_aws_config(docker_login_user.home, os.environ["AWS_ENDPOINT_URL"]):
        repo = machine_hub.add("ephemera-test/tiny-hub", files)
        workroot = _aws_job(aws_target, machine_hub.url)
        env = {**aws_target.env, "HF_ENDPOINT": loopback_hub.url,
               "EPHEMERA_HUB_PYTHON": hub_python,
               "EPHEMERA_AWS_INSTANCE_PROFILE": "ephemera-cache"}

        first, suite_log = _run(aws_target, env)
        assert "compile-cache-empty" in suite_log
        phases = {p["name"]: p for p in first["phases"]}
        assert phases["cache_save"]["ok"], first["phases"]
        hub = _keys(client, "hub-cache/hub/models--ephemera-test--tiny-hub")
        assert {k for k in hub if k.startswith("blobs/")} == {f"blobs/{repo.oid(n)}" for n in files}
        assert hub["refs/main"] == len(repo.commit) and s3_cache.LISTING in hub, hub
        assert not [k for k in hub if k.startswith("snapshots/")], hub
        listing = json.loads(client.get_object(Bucket=BUCKET, Key=f"hub-cache/hub/models--ephemera-test"
                                               f"--tiny-hub/{s3_cache.LISTING}")["Body"].read())
        assert listing == {repo.commit: {n: repo.oid(n) for n in files}}
        compiled = [k for k in _keys(client, "compile-cache") if k.endswith("/vllm/graph.bin")]
        assert len(compiled) == 1, compiled
        key = compiled[0].split("/")[0]
        assert [name for _, name in associated] == ["ephemera-cache"], associated

        # A fresh machine: nothing on the host, everything from S3.
        shutil.rmtree(Path(workroot) / ".cache")
        served = _resolve_gets(machine_hub)
        second, suite_log = _run(aws_target, env)
        assert _resolve_gets(machine_hub) == served, machine_hub.requests   # metadata only
        assert "graph-of-run-1" in suite_log and "compile-cache-empty" not in suite_log
        assert f"--model {workroot}/.cache/hf/hub/models--ephemera-test--tiny-hub/snapshots/" \
               f"{repo.commit}" in second["server_command"]
        again = {p["name"]: p for p in second["phases"]}
        assert again["weights"]["ok"] and again["cache_save"]["ok"], second["phases"]

        # The same key's directory in S3 under another vLLM's manifest: not restored.
        stored = client.get_object(Bucket=BUCKET, Key=f"compile-cache/{key}/{caches.MANIFEST}")
        foreign = json.loads(stored["Body"].read())
        foreign["fields"]["vllm"] = "0.0.1-other"
        client.put_object(Bucket=BUCKET, Key=f"compile-cache/{key}/{caches.MANIFEST}",
                          Body=json.dumps(foreign).encode())
        shutil.rmtree(Path(workroot) / ".cache")
        _third, suite_log = _run(aws_target, env)
        assert "compile-cache-empty" in suite_log and "graph-of-run-1" not in suite_log


def test_readme_gives_the_permissions_of_caches_in_s3():
    from tests.test_aws_iam_docs import aws_section

    section = aws_section()
    for needed in ("`iam:PassRole`", '"s3:GetObject"', '"s3:PutObject"', '"s3:ListBucket"',
                   '"s3:prefix"', "aws_instance_profile"):
        assert needed in section, needed
