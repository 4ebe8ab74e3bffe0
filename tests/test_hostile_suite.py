"""A suite that attacks its host: it plants symbolic links to files outside the run
directory (and to /) in its artifacts, in the server's log and in the job's artifact
list, and asks for an absolute path outside the run. Collect refuses each with a clear
warning and copies nothing from outside the run directory; the real artifacts still
come back. On docker it also tries to write into the model, which is mounted read-only.
Runs on the local, docker and ssh providers (the same SSH code serves aws)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.runlib import RunProcess

ATTACK = (
    "echo {canary} > {secret} && "
    "ln -s {secret} ../artifacts/stolen.txt && ln -s / ../artifacts/rootfs && "
    "mkdir -p ../artifacts/real && echo collected-ok > ../artifacts/real/file.txt && "
    "ln -s {secret} ../artifacts/real/inner-link && "
    "rm -f ../logs/vllm.log && ln -s {secret} ../logs/vllm.log && "
    "ln -s {secret} stolen-artifact.txt && "
    # The model the server loads (docker: mounted read-only from this machine).
    "for f in /ephemera-models/*/config.json; do [ -f \"$f\" ] || continue; "
    "if echo tampered >> \"$f\"; then echo MODEL-WRITTEN; else echo model-refused; fi; done; "
    "echo planted"
)


@pytest.mark.parametrize("target_name", ["local_target", "docker_target", "ssh_target"])
@pytest.mark.timeout(300)
def test_links_out_of_the_run_directory_are_refused(request, target_name, tmp_path):
    target = request.getfixturevalue(target_name)
    canary = f"CANARY-{uuid.uuid4().hex}"
    secret = f"/tmp/ephemera-canary-{uuid.uuid4().hex[:8]}"
    yaml = YAML()
    data = yaml.load(target.job.read_text())
    data["suite"]["command"] = ATTACK.format(canary=canary, secret=secret)
    data["artifacts"] = ["stolen-artifact.txt", "/etc/hostname"]
    with target.job.open("w") as fh:
        yaml.dump(data, fh)
    run = RunProcess(target.job, target.env, *target.args)
    try:
        code, result = run.finish(timeout=240)
    finally:
        Path(secret).unlink(missing_ok=True)
    assert code == 0, run.stderr[-3000:]
    artifacts = Path(result["artifacts_dir"])
    copied = {p.relative_to(artifacts).as_posix(): p for p in artifacts.rglob("*")}
    assert (artifacts / "artifacts" / "real" / "file.txt").read_text().strip() == "collected-ok"
    for name, path in copied.items():
        assert not path.is_symlink(), f"{name} came back as a link"
        if path.is_file():
            assert canary not in path.read_text(errors="replace"), f"{name} holds the outside file"
    for name in ("artifacts/stolen.txt", "artifacts/rootfs", "hostname", "stolen-artifact.txt",
                 "artifacts/real/inner-link"):
        assert name not in copied, f"{name} was copied"
    warnings = [ln for ln in run.stderr.splitlines() if "not collected:" in ln]
    for needle in ("stolen.txt", "rootfs", "inner-link", "vllm.log", "stolen-artifact.txt",
                   "/etc/hostname"):
        assert any(needle in w for w in warnings), f"no warning names {needle}: {warnings}"
    suite_log = (artifacts / "suite.log").read_text()
    assert "planted" in suite_log and "MODEL-WRITTEN" not in suite_log
    if target_name == "docker_target":   # the local model is mounted, never copied or writable
        assert "/ephemera-models/tiny-llama-" in result["server_command"]
        assert "model-refused" in suite_log
    assert target.leftovers(result["run_id"]) == []
