"""The ssh provider's work root: by default under the login user's home (mode 0700,
resolved on the host), never a directory another user could change."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ephemera_providers.ssh import SSHProvider

from ephemera.errors import InfraError
from ephemera.provider import LABEL_RUN_ID, Instance, LaunchSpec, Offer, make_labels

pytestmark = [pytest.mark.sshd, pytest.mark.timeout(120)]


def _spec(run_id: str, options: dict) -> LaunchSpec:
    expires = datetime.now(UTC) + timedelta(minutes=10)
    offer = Offer(provider="ssh", instance_type="cpu", region=None, gpu=None, gpu_count=0,
                  gpu_memory_gib=0.0, vcpus=1, memory_gib=1.0, price_per_hour=0.0)
    return LaunchSpec(run_id=run_id, job_name="workroot", offer=offer, image="host",
                      labels=make_labels(run_id, "workroot", "tester", expires),
                      expires_at=expires, options=options)


def _options(login, **extra) -> dict:
    server = login.server
    return {"host": server.host, "port": server.port, "user": server.user,
            "key": server.key_path, **extra}


def _uid(login) -> int:
    return login.home.stat().st_uid


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_default_workroot_is_private_under_the_login_users_home(docker_login_user):
    run_id = f"wr-default-{uuid.uuid4().hex[:8]}"
    options = _options(docker_login_user)
    provider = SSHProvider(target=options)
    instance = provider.launch(_spec(run_id, options))
    root = docker_login_user.home / "ephemera-runs"
    workdir = root / run_id
    assert instance.workdir == str(workdir) == instance.data["workdir"]
    assert workdir.is_dir() and (workdir / "labels.json").is_file()
    for path in (root, workdir):
        assert path.stat().st_uid == _uid(docker_login_user)
        assert _mode(path) == 0o700, f"{path} has mode {_mode(path):o}"
    # Another process terminates from the recorded instance alone.
    stored = Instance.from_dict(instance.to_dict())
    SSHProvider().terminate(stored)
    assert not workdir.exists() and root.is_dir()


def test_a_home_relative_workroot_is_made_with_mode_0700(docker_login_user):
    name = f"runs-wr-{uuid.uuid4().hex[:8]}"
    options = _options(docker_login_user, workroot=f"~/{name}")
    provider = SSHProvider(target=options)
    root = docker_login_user.home / name
    try:
        instance = provider.launch(_spec("wr-tilde-1", options))
        assert instance.workdir == str(root / "wr-tilde-1")
        assert _mode(root) == 0o700 and _mode(root / "wr-tilde-1") == 0o700
        # find resolves the same root on the host.
        assert [i.workdir for i in provider.find({LABEL_RUN_ID: "wr-tilde-1"})] == [instance.workdir]
        provider.terminate(instance)
        assert not (root / "wr-tilde-1").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("make, problem", [
    ("group-writable", "lets group or others write"),
    ("other-owner", "owned by uid 0"),
    ("symlink", "symbolic link"),
])
def test_an_unsafe_workroot_is_refused_naming_it(docker_login_user, make, problem):
    name = f"runs-bad-{uuid.uuid4().hex[:8]}"
    root = docker_login_user.home / name
    target = docker_login_user.home / f"{name}-target"
    if make == "symlink":
        target.mkdir(mode=0o700)
        os.chown(target, _uid(docker_login_user), -1)
        root.symlink_to(target)
    else:
        root.mkdir()
        if make == "group-writable":
            os.chown(root, _uid(docker_login_user), -1)
            os.chmod(root, 0o770)
        else:
            os.chmod(root, 0o755)   # root's own directory, readable by everyone
    options = _options(docker_login_user, workroot=f"~/{name}")
    try:
        with pytest.raises(InfraError, match=problem) as info:
            SSHProvider(target=options).launch(_spec("wr-bad-1", options))
        assert str(root) in str(info.value)
        assert not (root / "wr-bad-1").exists() and not (target / "wr-bad-1").exists()
    finally:
        root.unlink() if root.is_symlink() else shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)


def test_an_explicit_workroot_is_used_as_given_with_the_run_directory_checked(docker_login_user):
    workroot = docker_login_user.workroot("explicit")
    options = _options(docker_login_user, workroot=workroot)
    provider = SSHProvider(target=options)
    try:
        instance = provider.launch(_spec("wr-explicit-1", options))
        assert instance.workdir == f"{workroot}/wr-explicit-1"
        assert _mode(Path(instance.workdir)) == 0o700
        provider.terminate(instance)
        assert not Path(instance.workdir).exists()
        # A run directory someone else prepared (writable by others) is not used.
        planted = Path(workroot) / "wr-explicit-2"
        planted.mkdir()
        os.chmod(planted, 0o777)
        with pytest.raises(InfraError, match=f"{planted}: it is owned by uid 0"):
            provider.launch(_spec("wr-explicit-2", options))
        os.chown(planted, _uid(docker_login_user), -1)
        with pytest.raises(InfraError, match=f"{planted}: its mode 777 lets group or others"):
            provider.launch(_spec("wr-explicit-2", options))
        assert not (planted / "labels.json").exists()
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
