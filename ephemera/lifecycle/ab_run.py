"""Running an A/B job: its variants one after another on one machine (one boot, a
server per variant) or in parallel (one child ``ephemera run`` per variant), then the
side-by-side comparison, its gates and the exit code. Loading and placement are in
:mod:`ephemera.lifecycle.variants`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ephemera import errors
from ephemera.lifecycle.controller import Run
from ephemera.lifecycle.records import new_run_id
from ephemera.lifecycle.variants import (
    Placement,
    Variant,
    load_variants,
    offer_key,
    placement_lines,
    plan_placement,
)
from ephemera.masking import job_masker, mask_data
from ephemera.progress import Reporter
from ephemera.results.benchmark import benchmark_phase
from ephemera.results.compare import (
    COMPARE_JSON,
    COMPARE_MD,
    compare_sides,
    side_from_artifacts,
    text_lines,
)
from ephemera.results.compare import markdown as compare_markdown
from ephemera.results.gates import (
    RESULTS_JSON,
    RESULTS_MD,
    Judgement,
    judge,
    run_origin,
    verdict,
)
from ephemera.results.gates import markdown as results_markdown
from ephemera.results.history import RunRecord, record_run
from ephemera.results.judgements import GateRow, record_judgement
from ephemera.results.summary import append_step_summary
from ephemera.spec.jobfile import (
    LoadedJob,
)
from ephemera.spec.settings import get_settings

# ---- same machine ------------------------------------------------------------------

@dataclass
class Outcome:
    """What happened to one variant."""

    name: str
    run_id: str
    artifacts_dir: Path
    status: str = "not-run"
    exit_code: int = errors.EXIT_INFRA
    message: str = ""
    suite_status: int | None = None
    benchmark: Any = None
    seconds: float = 0.0
    cost_usd: float | None = None
    instance_type: str | None = None
    judgement: dict[str, Any] | None = None
    teardown_verified: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.name, "run_id": self.run_id, "status": self.status,
                "exit_code": self.exit_code, "message": self.message,
                "artifacts_dir": str(self.artifacts_dir), "cost_usd": self.cost_usd,
                "instance_type": self.instance_type, "teardown_verified": self.teardown_verified,
                **(self.judgement or {})}


class SharedRun(Run):
    """One instance, the variants one after another."""

    def __init__(self, variants: list[Variant], placement: Placement, group_dir: Path, **kwargs: Any) -> None:
        first = variants[0].loaded
        total = sum(v.job.timeout for v in variants)
        base = replace(first, job=first.job.model_copy(update={"timeout": total}))
        super().__init__(base, **kwargs)
        self.variants = variants
        self.shared_plan = placement.shared
        self.tps = placement.shared_tp
        self.group_dir = group_dir
        self.artifacts_dir = group_dir
        self.outcomes = {v.name: Outcome(v.name, f"{self.run_id}-{v.name}", group_dir / v.name)
                         for v in variants}
        self._current: Outcome | None = None
        self._done_collecting = False
        self._started = time.monotonic()

    def make_plan(self) -> Any:
        return self.shared_plan

    def _switch(self, variant: Variant | None, base_workdir: str) -> None:
        if variant is None:
            self.loaded, self.job = self._base_loaded, self._base_loaded.job
            self.artifacts_dir, self.workdir = self.group_dir, base_workdir
            return
        self.loaded, self.job = variant.loaded, variant.job
        self.artifacts_dir = self.outcomes[variant.name].artifacts_dir
        self.workdir = f"{base_workdir}/{variant.name}"
        offer = self.offer or self.shared_plan.offer
        tp = self.tps.get(variant.name, {}).get(offer_key(offer), self.shared_plan.tensor_parallel_size)
        self.plan = replace(self.shared_plan, tensor_parallel_size=tp)
        self.server_cmd, self.server_handle, self._port = None, None, None
        self.benchmark_result = None

    def serve_and_test(self, model_dir: Path | None, hub_id: str) -> int:
        self._base_loaded = self.loaded
        base_wd = self.workdir
        for variant in self.variants:
            out = self._current = self.outcomes[variant.name]
            self._switch(variant, base_wd)
            started = self._started = time.monotonic()
            self.reporter.info(f"variant {variant.name}: {variant.job.model.id} "
                               f"(artifacts {out.artifacts_dir})")
            out.status = "running"
            model_dir, hub_id = self._model_source()
            uploaded = self.upload(model_dir)
            self.start_server(uploaded or hub_id)
            self.wait_healthy()
            out.suite_status = self.run_suite()
            if self.job.benchmark is not None:
                out.benchmark = self.benchmark_result = benchmark_phase(self)
            self.collect(budget=max(10.0, min(300.0, self.deadline - time.monotonic() - 60)))
            with self.phase("server_stop", variant.name):
                self.remote.stop(self.server_handle, grace=10.0)
            out.status = "passed" if out.suite_status == 0 else "failed"
            out.seconds = time.monotonic() - started
        self._current = None
        self._done_collecting = True
        self._switch(None, base_wd)
        return 0

    def collect(self, budget: float, suspect_channel: bool = False) -> None:
        if self._done_collecting:
            return
        super().collect(budget, suspect_channel)

    def judge(self, status: str, code: int, message: str) -> tuple[str, int, str]:
        """The machine's run is not judged as one job: each variant is, afterwards."""
        current = self._current
        if current is not None:       # the variant that was running when the run stopped
            current.status, current.exit_code, current.message = status, code, message
            current.seconds = time.monotonic() - self._started
        if hasattr(self, "_base_loaded"):
            self.loaded, self.job = self._base_loaded, self._base_loaded.job
        self.artifacts_dir = self.group_dir
        return status, code, message

    def record_judgement(self) -> dict[str, Any] | None:
        return None


def _split_cost(outcomes: list[Outcome], total: float | None) -> None:
    """The machine's cost shared out: each variant's own time, the rest (boot, pull,
    teardown) in equal parts."""
    if total is None:
        return
    ran = [o for o in outcomes if o.seconds > 0]
    own = sum(o.seconds for o in ran)
    for o in outcomes:
        o.cost_usd = 0.0
    if not ran:
        return
    for o in ran:
        o.cost_usd = round(total * (o.seconds / own if own else 1 / len(ran)), 6)


def _judge_outcome(variant: Variant, out: Outcome, *, settings: Any, masker: Any,
                   branch: str, commit: str) -> None:
    """A finished variant's results, figures and gates, written and recorded like a run's."""
    if out.suite_status is None:
        return
    code = errors.EXIT_OK if out.suite_status == 0 else errors.EXIT_TESTS_FAILED
    message = "the suite passed" if code == 0 else f"the suite failed (exit status {out.suite_status})"
    judgement = judge(variant.job, tier=variant.loaded.tier, run_id=out.run_id,
                      artifacts_dir=out.artifacts_dir, bench=out.benchmark, branch=branch,
                      commit=commit, history=settings.history_path)
    out.status, out.exit_code, out.message = verdict(judgement, variant.job.gates, out.status, code, message)
    data = mask_data(judgement.to_dict(), masker)
    out.judgement = data
    out.artifacts_dir.mkdir(parents=True, exist_ok=True)
    (out.artifacts_dir / RESULTS_MD).write_text(masker(results_markdown(judgement)), encoding="utf-8")
    (out.artifacts_dir / RESULTS_JSON).write_text(json.dumps(data, indent=2), encoding="utf-8")
    _record(variant, out, settings=settings, judgement=judgement, masker=masker)


def _record(variant: Variant, out: Outcome, *, settings: Any, judgement: Any, masker: Any) -> None:
    j: Judgement = judgement
    # The machine's cost is recorded once, under the machine's run id; the split is in
    # compare.json.
    record_run(RunRecord(
        run_id=out.run_id, job=variant.job.name, tier=variant.loaded.tier, model=variant.job.model.id,
        provider=variant.job.resources.provider or settings.default_provider,
        instance_type=out.instance_type or "", region=None, status=out.status,
        exit_code=out.exit_code, started_at=datetime.now(UTC), duration_seconds=out.seconds,
        cost_usd=0.0, phases={}), path=settings.history_path)
    stored: dict[str, dict[str, tuple[int, int, int, int]]] = {}
    if j.results.found:
        t = j.results.overall
        stored["total"] = {"all": (t.passed, t.failed, t.errors, t.skipped)}
        if j.group_by:
            stored[j.group_by] = {masker(k): (c.passed, c.failed, c.errors, c.skipped)
                                  for k, c in j.results.groups().items()}
    metrics = j.benchmark.metrics if j.benchmark is not None else {}
    gates = [GateRow(g.gate, g.group, g.value, g.bound, g.baseline, g.passed, masker(g.line))
             for g in j.gates]
    record_judgement(out.run_id, branch=j.branch, commit=j.commit, results=stored,
                     metrics=metrics, gates=gates, path=settings.history_path)


def run_same_machine(variants: list[Variant], placement: Placement, group_id: str, group_dir: Path, *,
                     settings: Any, reporter: Any, provider_name: str | None,
                     catalog: Path | None) -> tuple[list[Outcome], Any]:
    run = SharedRun(variants, placement, group_dir, settings=settings, reporter=reporter,
                    provider_name=provider_name, catalog=catalog, run_id=group_id)
    result = run.execute()
    outcomes = [run.outcomes[v.name] for v in variants]
    usd = (result.cost or {}).get("usd")
    _split_cost(outcomes, usd)
    branch, commit = run_origin(variants[0].loaded.base_dir)
    for variant, out in zip(variants, outcomes, strict=True):
        out.instance_type = result.instance_type
        out.teardown_verified = result.teardown_verified
        if out.status in ("passed", "failed") and out.suite_status is not None:
            try:
                _judge_outcome(variant, out, settings=settings, masker=run.masker,
                               branch=branch, commit=commit)
            except Exception as exc:  # noqa: BLE001 - the run already tore down
                reporter.warn(f"variant {variant.name}: could not judge the results: {exc}")
        elif out.status == "not-run":
            out.message = f"not run: the machine's run ended first ({result.status})"
    return outcomes, result


# ---- parallel ----------------------------------------------------------------------

def _child_command(job_file: str, variant: str, run_id: str, artifacts: Path, *, tier: str | None,
                   provider_name: str | None, catalog: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "ephemera", "run", job_file, "--json", "--variant", variant,
           "--run-id", run_id, "--artifacts-dir", str(artifacts)]
    if tier:
        cmd += ["--tier", tier]
    if provider_name:
        cmd += ["--provider", provider_name]
    if catalog:
        cmd += ["--catalog", str(catalog)]
    return cmd


def run_parallel(job_file: str, variants: list[Variant], group_id: str, group_dir: Path, *,
                 reporter: Any, tier: str | None, provider_name: str | None,
                 catalog: Path | None) -> tuple[list[Outcome], int | None]:
    """Every variant as its own `ephemera run` at once; signals are passed on to each.
    Returns the outcomes and the first signal received (None)."""
    children: list[tuple[Outcome, subprocess.Popen, list[str], threading.Thread]] = []
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if not received:
            reporter.warn(f"{signal.Signals(signum).name} received: passing it to every variant, "
                          "each tears its instance down")
        received.append(signum)
        for _, proc, _, _ in children:
            if proc.poll() is None:
                proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for v in variants:
            out = Outcome(v.name, f"{group_id}-{v.name}", group_dir / v.name)
            cmd = _child_command(job_file, v.name, out.run_id, out.artifacts_dir, tier=tier,
                                 provider_name=provider_name, catalog=catalog)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True, env=dict(os.environ))
            stdout: list[str] = []
            threading.Thread(target=lambda p=proc, s=stdout: s.append(p.stdout.read()), daemon=True).start()
            echo = threading.Thread(target=_echo, args=(proc, v.name), daemon=True)
            echo.start()
            children.append((out, proc, stdout, echo))
            if received:
                break
        for out, proc, stdout, echo in children:
            while proc.poll() is None:
                time.sleep(0.2)
            echo.join(timeout=5)
            _read_child(out, proc.returncode, stdout)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    started = {o.name for o, *_ in children}
    outcomes = [o for o, *_ in children]
    outcomes += [Outcome(v.name, f"{group_id}-{v.name}", group_dir / v.name, message="not started")
                 for v in variants if v.name not in started]
    return outcomes, received[0] if received else None


def _echo(proc: subprocess.Popen, name: str) -> None:
    for line in proc.stderr:
        sys.stderr.write(f"[{name}] {line}")
        sys.stderr.flush()


def _read_child(out: Outcome, code: int, stdout: list[str]) -> None:
    deadline = time.monotonic() + 5
    while not stdout and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        data = json.loads(stdout[0]) if stdout and stdout[0].strip() else {}
    except ValueError:
        data = {}
    out.exit_code = code
    out.status = data.get("status") or ("error" if code else "passed")
    out.message = data.get("message") or f"ephemera run exited with {code}"
    cost = data.get("cost") or {}
    out.cost_usd = cost.get("usd", cost.get("cost_usd"))
    out.instance_type = data.get("instance_type")
    out.teardown_verified = data.get("teardown_verified")
    out.judgement = {k: data[k] for k in ("results", "benchmark", "gates", "gates_failed") if k in data}
    phases = data.get("phases") or []
    out.seconds = sum(p.get("seconds", 0) for p in phases if isinstance(p, dict))


# ---- the whole A/B run ---------------------------------------------------------------

def comparison_of(variants: list[Variant], outcomes: list[Outcome], placement: str) -> Any:
    sides = []
    for v, out in zip(variants, outcomes, strict=True):
        group = v.job.results.group_by or (v.job.gates.pass_rate_by.group
                                           if v.job.gates.pass_rate_by is not None else None)
        side = side_from_artifacts(v.name, out.artifacts_dir, junit=v.job.results.junit, group_by=group)
        side.run_id, side.status, side.cost_usd = out.run_id, out.status, out.cost_usd
        side.instance = out.instance_type
        sides.append(side)
    finished = all(o.status in ("passed", "failed") for o in outcomes)
    spec = variants[0].compare if finished else None
    comparison = compare_sides(sides, spec, placement)
    if not finished and variants[0].compare is not None:
        left = ", ".join(f"{o.name} {o.status}" for o in outcomes if o.status not in ("passed", "failed"))
        comparison.notes.append(f"compare gates not judged: not every variant ran to its end ({left})")
    return comparison


def exit_code(outcomes: list[Outcome], compare_failed: bool, signum: int | None) -> int:
    codes = [o.exit_code for o in outcomes]
    if errors.EXIT_TEARDOWN_FAILED in codes:
        return errors.EXIT_TEARDOWN_FAILED
    if signum is not None:
        return 128 + signum
    signalled = [c for c in codes if c >= 128]
    if signalled:
        return signalled[0]
    worse = [c for c in codes if c not in (errors.EXIT_OK, errors.EXIT_TESTS_FAILED)]
    if worse:
        return worse[0]
    if compare_failed or errors.EXIT_TESTS_FAILED in codes:
        return errors.EXIT_TESTS_FAILED
    return errors.EXIT_OK


def _write(group_dir: Path, comparison: Any, outcomes: list[Outcome], placement: Placement,
           masker: Any, group_id: str) -> None:
    group_dir.mkdir(parents=True, exist_ok=True)
    data = {"run_id": group_id, "placement": placement.to_dict(),
            "variants": [o.to_dict() for o in outcomes], "comparison": comparison.to_dict()}
    (group_dir / COMPARE_JSON).write_text(json.dumps(mask_data(data, masker), indent=2), encoding="utf-8")
    text = masker(compare_markdown(comparison))
    (group_dir / COMPARE_MD).write_text(text, encoding="utf-8")

    append_step_summary(text)


def run_variants(job_file: str, loaded: LoadedJob, *, tier: str | None, provider_name: str | None,
                 catalog: Path | None, dry_run: bool, as_json: bool) -> int:
    """`ephemera run` of a job with variants. Returns the exit code."""
    import click


    settings = get_settings()
    reporter = Reporter()
    masker = job_masker(loaded, warn=reporter.warn)
    variants = load_variants(loaded, check_provider=provider_name is None)
    placement = plan_placement(variants, catalog=catalog, provider_name=provider_name)
    if dry_run:
        if as_json:
            click.echo(json.dumps({"run_id": None, "status": "dry-run", "exit_code": 0,
                                   **placement.to_dict()}, indent=2))
        else:
            for line in placement_lines(placement):
                click.echo(line)
            click.echo("nothing was launched (--dry-run)")
        return 0
    group_id = new_run_id(loaded.job.name)
    group_dir = (settings.artifacts_dir / group_id).resolve()
    reporter.info(f"A/B run {group_id}: variants {', '.join(v.name for v in variants)}; "
                  f"placement {placement.choice} ({placement.reason})")
    signum = None
    if placement.choice == "same-machine":
        outcomes, result = run_same_machine(variants, placement, group_id, group_dir, settings=settings,
                                            reporter=reporter, provider_name=provider_name, catalog=catalog)
        if result.exit_code >= 128:
            signum = result.exit_code - 128
        for out in outcomes:
            if out.status not in ("passed", "failed"):
                out.exit_code = result.exit_code
        if result.exit_code == errors.EXIT_TEARDOWN_FAILED:
            outcomes[0].exit_code = errors.EXIT_TEARDOWN_FAILED
    else:
        outcomes, signum = run_parallel(job_file, variants, group_id, group_dir, reporter=reporter,
                                        tier=tier, provider_name=provider_name, catalog=catalog)
    comparison = comparison_of(variants, outcomes, placement.choice)

    for line in text_lines(comparison):
        reporter.info(masker(line))
    for gate in comparison.failed:
        reporter.error(masker(gate.line))
    try:
        _write(group_dir, comparison, outcomes, placement, masker, group_id)
    except OSError as exc:
        reporter.warn(f"could not write the comparison: {exc}")
    code = exit_code(outcomes, bool(comparison.failed), signum)
    status = "passed" if code == 0 else "failed" if code == 1 else \
        "interrupted" if code >= 128 else "error"
    failed = comparison.failed
    message = (f"{len(failed)} compare gate(s) failed: " + "; ".join(g.line for g in failed)) if failed \
        else "; ".join(f"{o.name}: {o.status}" for o in outcomes)
    if as_json:
        click.echo(json.dumps(mask_data({
            "run_id": group_id, "status": status, "exit_code": code, "message": message,
            "placement": placement.choice, "artifacts_dir": str(group_dir),
            "variants": [o.to_dict() for o in outcomes], "comparison": comparison.to_dict()}, masker),
            indent=2))
    else:
        click.echo(f"{status.upper()}: {masker(message)} | artifacts {group_dir}", err=True)
    return code
