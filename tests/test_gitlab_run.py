"""The GitLab template run for real. gitlab-ci-local (4.70.1) runs the component's job
with the docker provider and the stand-in server, then a later job that reads the
dotenv report; the JUnit file is where the report points and nothing is left.

gitlab-ci-local does not forward a cancel, so cancellation is its own test: the job's
script and after_script, taken from the template, run as GitLab's executors run them.
The Docker executor sends SIGTERM to the script and (GitLab 17.0 and later) runs
after_script alongside it; the shell executor may send nothing at all before running
after_script. Either way this job's run is gone and a second job's run, on the same
runner with the same project directory, is left alone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.fixtures.common import missing_component
from tests.fixtures.standin_targets import STANDIN
from tests.runlib import run_env, write_job

ROOT = Path(__file__).resolve().parents[1]
COMPONENT = ROOT / "templates" / "ephemera.yml"
BIN = str(Path(os.sys.executable).parent)
JUNIT = ("printf '<testsuite name=\"gl\" tests=\"1\" failures=\"0\"><testcase classname=\"gl\" "
         "name=\"standin_answers\"/></testsuite>\\n' > junit.xml")


def _standin_job(directory: Path, image: str, command: str, name: str = "gitlab-docker") -> Path:
    shutil.copytree(STANDIN, directory / "standin", dirs_exist_ok=True)
    return write_job(directory, "local-cpu-smoke.yaml", {
        "name": name, "image": image,
        "server": {"launcher": "api_server", "python": "python3", "args": [],
                   "env": {"PYTHONPATH": "suite/standin"}, "health_timeout": "1m"},
        "suite": {"files": ["standin"], "command": command, "timeout": "3m"},
        "artifacts": ["junit.xml"],
        "resources": {"provider": "docker", "docker": {"network": "host"}},
        "timeout": "5m",
    })


def _containers(**labels: str) -> list[str]:
    filters = [arg for k, v in labels.items() for arg in ("--filter", f"label=dev.ephemera.{k}={v}")]
    out = subprocess.run(["docker", "ps", "-aq", *filters], capture_output=True, text=True,
                         timeout=60).stdout
    return out.split()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, timeout=60,
                   env={**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com",
                        "GIT_COMMITTER_NAME": "ci", "GIT_COMMITTER_EMAIL": "ci@example.com"})


PIPELINE = """\
stages: [test, report]
include:
  - local: templates/ephemera.yml
    inputs:
      job: {job}
      provider: docker
      version: installed
      name: gpu-test
report:
  stage: report
  needs: [gpu-test]
  script:
    - echo "later job sees status=$EPHEMERA_STATUS cost=$EPHEMERA_COST_USD run=$EPHEMERA_RUN_ID"
    - test "$EPHEMERA_STATUS" = passed
"""


@pytest.mark.timeout(600)
def test_gitlab_ci_local_runs_the_component_with_the_docker_provider(tmp_path, cpu_image):
    tool = shutil.which("gitlab-ci-local")
    if tool is None:
        missing_component("gitlab-ci-local is not installed (npm install -g gitlab-ci-local@4.70.1)")
    repo = tmp_path / "project"
    (repo / "templates").mkdir(parents=True)
    shutil.copy(COMPONENT, repo / "templates" / "ephemera.yml")
    job = _standin_job(repo, cpu_image, JUNIT)
    (repo / ".gitlab-ci.yml").write_text(PIPELINE.format(job=job.name))
    _git(repo, "init", "-q")
    _git(repo, "remote", "add", "origin", "https://gitlab.example.com/group/project.git")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "pipeline")
    env = run_env(PATH=f"{BIN}:{os.environ['PATH']}",
                  GCL_IGNORE_PREDEFINED_VARS="CI_PIPELINE_SOURCE",
                  EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                  EPHEMERA_CONFIG=str(tmp_path / "none.toml"))
    result = subprocess.run([tool, "--force-shell-executor", "--variable", "CI_PIPELINE_SOURCE=web"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=540)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    # after_script's summary (gitlab-ci-local shows a job's stderr after its stdout, so
    # it is not the last line here as it is in GitLab's job log).
    ours = [ln.split(" > ", 1)[1] for ln in log.splitlines() if re.match(r"^gpu-test\s+> ", ln)]
    summary = [ln for ln in ours if ln.startswith("ephemera: run ")]
    assert len(summary) == 1, ours
    assert re.fullmatch(r"ephemera: run gitlab-docker-\S+ passed, cost \$0\.0000", summary[0])
    run_id = summary[0].split()[2]
    later = [re.sub(r"^report\s+> ", "", ln) for ln in log.splitlines()
             if re.match(r"^report\s+> later job sees", ln)]
    assert later == [f"later job sees status=passed cost=0.0000 run={run_id}"], log[-3000:]
    junit = list((repo / ".gitlab-ci-local").rglob(f"ephemera-runs/{run_id}/junit.xml"))
    assert junit and "standin_answers" in junit[0].read_text()
    dotenv = list((repo / ".gitlab-ci-local").rglob("ephemera.env"))
    assert dotenv and f"EPHEMERA_RUN_ID={run_id}" in dotenv[0].read_text()
    assert _containers(**{"run-id": run_id}) == []
    states = list(repo.rglob(f".ephemera/*/state/runs/{run_id}.json"))
    assert states and '"status": "terminated"' in states[0].read_text()


# ---- cancellation, as GitLab's executors do it -------------------------------------

def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), ""), value)


class CIJob:
    """One CI job of the template on a runner: its variables as GitLab expands them,
    its before_script + script in one shell, its after_script in another."""

    def __init__(self, project: Path, job_id: int, job_file: Path, env: dict[str, str]) -> None:
        doc = list(YAML(typ="safe").load_all(COMPONENT.read_text()))
        inputs = {name: spec.get("default", "") for name, spec in doc[0]["spec"]["inputs"].items()}
        inputs.update(job=str(job_file), provider="docker", version="installed")
        text = re.sub(r"\$\[\[\s*inputs\.([\w-]+)\s*\]\]", lambda m: str(inputs[m.group(1)]),
                      COMPONENT.read_text().split("\n---\n", 1)[1])
        self.job = next(iter(YAML(typ="safe").load(text).values()))
        self.env = {**env, "CI_PROJECT_DIR": str(project), "CI_JOB_ID": str(job_id),
                    "CI_PIPELINE_SOURCE": "web"}
        for key, value in self.job["variables"].items():
            self.env[key] = _expand(str(value), self.env)
        self.project = project
        self.log = project / f"job-{job_id}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        script = "\n".join(self.job["before_script"] + self.job["script"])
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(["sh", "-c", script], cwd=self.project, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"'{text}' not seen: {self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def run_id(self) -> str:
        match = re.search(r"\] run (\S+): job ", self.log.read_text())
        assert match, self.log.read_text()[-2000:]
        return match.group(1)

    def after_script(self) -> subprocess.Popen:
        return subprocess.Popen(["sh", "-c", "\n".join(self.job["after_script"])], cwd=self.project,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@pytest.mark.timeout(600)
def test_cancel_tears_down_this_jobs_run_and_not_another_jobs(tmp_path, cpu_image):
    project = tmp_path / "builds" / "project"   # both jobs in one project directory
    project.mkdir(parents=True)
    job_file = _standin_job(project, cpu_image, "sleep 300")
    env = run_env(PATH=f"{BIN}:{os.environ['PATH']}", EPHEMERA_DATA_DIR=str(tmp_path / "data"),
                  EPHEMERA_CONFIG=str(tmp_path / "none.toml"))
    for name in ("EPHEMERA_STATE_DIR", "EPHEMERA_ARTIFACTS_DIR"):
        env.pop(name, None)
    first, second = CIJob(project, 7001, job_file, env), CIJob(project, 7002, job_file, env)
    try:
        first.start()
        second.start()
        first.wait_for("> suite", timeout=180)
        second.wait_for("> suite", timeout=180)
        first_id, second_id = first.run_id(), second.run_id()
        assert _containers(**{"run-id": first_id}) and _containers(**{"run-id": second_id})

        # Docker executor: SIGTERM to the script, after_script at the same moment.
        assert first.proc is not None
        first.proc.send_signal(signal.SIGTERM)
        after = first.after_script()
        after_out, _ = after.communicate(timeout=180)
        code = first.proc.wait(timeout=120)
        assert code == 128 + signal.SIGTERM, first.log.read_text()[-3000:]
        assert after.returncode == 0, after_out
        assert _containers(**{"run-id": first_id}) == [], after_out
        # The run's own teardown and after_script's overlap: both end in "gone".
        assert f"{first_id}: gone" in after_out or "nothing to tear down" in after_out, after_out
        assert "Traceback" not in first.log.read_text()
        assert second.proc is not None and second.proc.poll() is None, second.log.read_text()[-3000:]
        assert _containers(**{"run-id": second_id}), "the other job's run was torn down"

        # Shell executor: no signal at all; after_script runs while the script still runs.
        after = second.after_script()
        after_out, _ = after.communicate(timeout=180)
        assert after.returncode == 0, after_out
        assert _containers(**{"run-id": second_id}) == [], after_out
        code = second.proc.wait(timeout=120)
        assert code != 0, second.log.read_text()[-3000:]
        assert "Traceback" not in second.log.read_text()
    finally:
        first.kill()
        second.kill()
        for job in (first, second):
            subprocess.run(["ephemera", "down", "--all", "--force"], env=job.env, cwd=project,
                           capture_output=True, timeout=120)
    left = _containers(job="gitlab-docker")
    assert left == [], left
