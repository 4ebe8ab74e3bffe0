"""`ephemera logs --follow` on a live run masks the run's secrets: the server log comes
straight from the instance, so the command masks it with what the run's job file
substitutes and the secret-looking values of its environment. Docker provider, the
stand-in server, which prints the HF_TOKEN it was given (as a server logging its
configuration would)."""

from __future__ import annotations

import uuid

import pytest

from tests.runlib import RunProcess, ephemera
from tests.test_ls_logs import Follower


@pytest.mark.timeout(300)
def test_live_server_log_is_masked(docker_target):
    target = docker_target
    canary = f"canary-{uuid.uuid4().hex}"
    text = target.job.read_text()
    text = text.replace("command: echo suite-started",
                        "command: for i in 1 2 3 4 5; do echo tick-$i; sleep 1; done")
    text = text.replace("PYTHONPATH: suite/standin",
                        "PYTHONPATH: suite/standin\n    HF_TOKEN: ${EPHEMERA_TEST_CANARY}\n"
                        "    STANDIN_ECHO_ENV: HF_TOKEN")
    assert "HF_TOKEN" in text, text
    target.job.write_text(text)
    env = {**target.env, "EPHEMERA_TEST_CANARY": canary}
    run = RunProcess(target.job, env, *target.args)
    try:
        run.wait_for("tick-1", timeout=120)
        follower = Follower(run.run_id(), env, "--server")
        code, _ = run.finish(timeout=120)
        assert code == 0, run.stderr[-3000:]
        assert follower.finish(timeout=60) == 0
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    shown = [line for _, line in follower.lines]
    assert "config HF_TOKEN=***" in shown, shown
    assert not any(canary in line for line in shown)
    after = ephemera("logs", run.run_id(), "--server", env=env, timeout=60)
    assert canary not in after.stdout and "config HF_TOKEN=***" in after.stdout
