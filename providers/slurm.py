"""The ``slurm`` provider: run jobs on a Slurm cluster through Slurm's own tools.

Scheduling, queueing and limits stay Slurm's. Offers come from ``sinfo`` (per
partition: GPU type and count per node from GRES, CPUs, memory), with each GPU type's
memory from the catalog and an optional price per GPU-hour from the settings.

Launch submits (``sbatch --parsable``) a job that only holds the allocation: the GPUs
of the plan (``--gres=gpu:TYPE:N``), CPUs and memory in proportion, the run id as job
name and the ephemera labels in ``--comment``. The job is the dead-man switch: its
``--time`` covers the run's deadline, and its script ends itself at the run's expiry
whenever it started; either way it kills every process group the run started
(recorded in ``.pgids`` in the run's directory, which lives on the file system the
login side and the nodes share) and removes the directory. Commands run inside the
allocation through ``srun --jobid=ID --overlap``, so vLLM sees only the GPUs Slurm
gave the job. While the job is PENDING the instance says so with Slurm's reason and
carries ``queued`` and ``queue_timeout`` in its data: the controller shows that phase,
bounds it and does not bill it. Terminate cancels the job (``scancel``) and waits until
it has left the queue; ``find`` reads ``squeue --json`` for jobs whose comment carries
ephemera labels.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

from ephemera_providers._deadman import check_run_id, cleanup_script, prefixed, unprefixed
from ephemera_providers.slurm_remote import SlurmRemote, SlurmTools, ToolResult, srun_prefix

from ephemera.errors import ConfigError, InfraError, TeardownError
from ephemera.provider import (
    LABEL_RUN_ID,
    BuiltinImage,
    Capabilities,
    Instance,
    InstanceState,
    LaunchSpec,
    Offer,
    OfferRequest,
    PortChoice,
    Runs,
)
from ephemera.spec.settings import get_settings

COMMENT_PREFIX = "ephemera "
JOB_NAME_PREFIX = "ephemera-"
LEAVE_QUEUE_SECONDS = 120.0
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
               "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "REQUEUE_HOLD",
               "REQUEUE_FED", "SPECIAL_EXIT"}
QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}
GRES_RE = re.compile(r"^gpu:(?P<type>[^:(]+):(?P<count>\d+)")

# The batch script: holds the allocation until the run's expiry, then (or on SIGTERM
# from scancel or Slurm's time limit) ends the run's processes and removes its directory.
_HOLDER = (
    "until={until}; c={cleanup}; trap 'sh -c \"$c\"; exit 0' TERM INT; "
    'while [ "$(date +%s)" -lt "$until" ]; do sleep 5 & wait $!; done; '
    'sh -c "$c"'
)


class SlurmProvider:
    """Jobs of a Slurm cluster. See the module docstring."""

    name: ClassVar[str] = "slurm"

    def __init__(self, login_host: str | None = None) -> None:
        settings = get_settings()
        self.settings = settings
        self.tools = SlurmTools(login_host or settings.slurm_login_host)

    @classmethod
    def capabilities(cls, options: Mapping[str, Any]) -> Capabilities:
        # A node is shared with other jobs: a free port, the host's 127.0.0.1 only.
        return Capabilities(runs=Runs.MACHINE, port=PortChoice.FREE_ON_MACHINE,
                            server_bind="127.0.0.1", container_network="bridge",
                            builtin_image=BuiltinImage.ON_MACHINE)

    @classmethod
    def check(cls) -> tuple[bool, str]:
        provider = cls()
        try:
            out = provider.tools.run(["sinfo", "-h", "-o", "%P %a %D"], timeout=20)
        except InfraError as exc:
            return False, str(exc)
        if out.returncode != 0:
            return False, f"sinfo on {provider.tools.where}: {out.why()}"
        return True, f"Slurm on {provider.tools.where}: partitions " + ", ".join(
            line.split()[0] for line in out.stdout.splitlines() if line.split())

    def describe(self) -> str:
        return f"jobs of the Slurm cluster reached from {self.tools.where}"

    # -- offers

    def _partition(self, options: Mapping[str, Any] | None) -> str | None:
        return _option(options, "partition") or self.settings.slurm_partition

    def offers(self, request: OfferRequest) -> list[Offer]:
        out = self._tool(["sinfo", "-h", "-o", "%R|%G|%c|%m|%a"])
        wanted = self._partition(request.options)
        memory = gpu_memory_table()
        found: dict[str, Offer] = {}
        for line in out.stdout.splitlines():
            for offer in parse_sinfo_line(line, memory, self.settings.slurm_price_per_gpu_hour):
                if wanted and offer.region != wanted:
                    continue
                found.setdefault(f"{offer.region}/{offer.instance_type}", offer)
        return list(found.values())

    # -- lifecycle

    def _tool(self, argv: list[str]) -> ToolResult:
        out = self.tools.run(argv)
        if out.returncode != 0:
            raise InfraError(f"{argv[0]} on {self.tools.where} failed: {out.why()}")
        return out

    def _workdir(self, run_id: str) -> str:
        root = self.settings.slurm_workroot
        if root.startswith("~/") and self.tools.login_host is None:
            import os

            root = os.path.expanduser(root)
        elif root.startswith("~/"):
            root = "$HOME/" + root[2:]
        return f"{root.rstrip('/')}/{check_run_id(run_id)}"

    def launch(self, spec: LaunchSpec) -> Instance:
        existing = self._jobs(name=JOB_NAME_PREFIX + check_run_id(spec.run_id))
        if existing:
            return existing[0]
        workdir = self._make_workdir(spec)
        argv = self._sbatch_argv(spec, workdir)
        out = self.tools.run(argv)
        job_id = out.stdout.strip().split(";")[0]
        if out.returncode != 0 or not job_id.isdigit():
            self.tools.shell().run(cleanup_script(workdir, spec.run_id), timeout=60)
            raise ConfigError(f"Slurm refused the job for run {spec.run_id} "
                              f"({_request_text(spec)}): {out.why()}")
        return self._instance(job_id, spec.run_id, "PENDING", "", dict(spec.labels), workdir,
                              spec.offer.instance_type, spec.offer.region, "")

    def _make_workdir(self, spec: LaunchSpec) -> str:
        workdir = self._workdir(spec.run_id)
        record = json.dumps({"run_id": spec.run_id, "labels": prefixed(dict(spec.labels))})
        made = self.tools.shell().run(
            f'd="{workdir}"; mkdir -p -m 700 "$d" && : > "$d/.pgids" && '
            f'printf "%s\\n" {shlex.quote(record)} > "$d/labels.json" && echo "$d"', timeout=60)
        lines = made.output_tail.strip().splitlines()
        if not made.ok or not lines:
            raise InfraError(f"could not make the run directory {workdir} on "
                             f"{self.tools.where}: {made.output_tail.strip()[-300:]}")
        return lines[-1]

    def _sbatch_argv(self, spec: LaunchSpec, workdir: str) -> list[str]:
        offer, options = spec.offer, spec.options.get("options") or {}
        gpus = spec.gpu_count or offer.gpu_count
        if gpus and not offer.gpu:
            raise ConfigError(f"offer {offer.instance_type} has no GPU type to ask Slurm for")
        seconds = (spec.expires_at - datetime.now(UTC)).total_seconds()
        if seconds <= 0:
            raise ConfigError(f"run {spec.run_id} has expired already ({spec.expires_at})")
        holder = _HOLDER.format(until=int(spec.expires_at.timestamp()),
                                cleanup=shlex.quote(cleanup_script(workdir, spec.run_id)))
        argv = ["sbatch", "--parsable", f"--job-name={JOB_NAME_PREFIX}{spec.run_id}",
                "--nodes=1", "--ntasks=1", f"--cpus-per-task={max(1, offer.vcpus)}",
                f"--mem={max(1, int(offer.memory_gib * 1024))}M",
                f"--time={max(1, math.ceil(seconds / 60))}",
                f"--comment={COMMENT_PREFIX}{json.dumps(prefixed(dict(spec.labels)), sort_keys=True)}",
                f"--chdir={workdir}", f"--output={workdir}/slurm-%j.out", "--export=NONE"]
        if gpus:
            argv.append(f"--gres=gpu:{offer.gpu}:{gpus}")
        for flag, value in (("partition", offer.region or self._partition(options)),
                            ("account", _option(options, "account") or self.settings.slurm_account),
                            ("qos", _option(options, "qos") or self.settings.slurm_qos)):
            if value:
                argv.append(f"--{flag}={value}")
        argv += shlex.split(self.settings.slurm_sbatch_options or "")
        return argv + [f"--wrap={holder}"]

    def poll(self, instance: Instance) -> Instance:
        if not instance.id.isdigit():
            return instance.evolve(state=InstanceState.TERMINATED)
        jobs = self._jobs(job_id=instance.id)
        if not jobs:
            return instance.evolve(state=InstanceState.TERMINATED, message="no longer in the queue")
        return jobs[0]

    def terminate(self, instance: Instance) -> None:
        ids = [instance.id] if instance.id.isdigit() else []
        ids += [j.id for j in self._jobs(name=JOB_NAME_PREFIX + check_run_id(instance.run_id))
                if j.id not in ids]
        workdir = instance.data.get("workdir") or self._workdir(instance.run_id)
        if workdir.rstrip("/").rsplit("/", 1)[-1] != instance.run_id:
            raise ConfigError(f"the recorded working directory {workdir} of run "
                              f"{instance.run_id} is not the run's: not touching it")
        for job_id in ids:
            self._cancel(job_id, workdir, instance.run_id)
        # The directory on the shared file system (the job's own clean-up may not have run).
        done = self.tools.shell().run(cleanup_script(workdir, instance.run_id), timeout=60)
        if not done.ok:
            raise TeardownError(f"could not remove the run directory {workdir}: "
                                f"{done.output_tail.strip()[-300:]}")

    def _cancel(self, job_id: str, workdir: str, run_id: str) -> None:
        jobs = self._jobs(job_id=job_id)
        if jobs and jobs[0].data.get("slurm_state") == "RUNNING":
            # End the run's detached processes on the node first (Slurm only ends the job's own).
            self.tools.shell().run(srun_prefix(job_id) + "sh -c " + shlex.quote(
                cleanup_script(workdir, run_id)), timeout=60)
        if jobs:
            self._tool(["scancel", job_id])
        deadline = time.monotonic() + LEAVE_QUEUE_SECONDS
        while self._jobs(job_id=job_id):
            if time.monotonic() > deadline:
                raise TeardownError(f"Slurm job {job_id} was still in the queue "
                                    f"{LEAVE_QUEUE_SECONDS:.0f}s after scancel")
            time.sleep(0.5)

    def find(self, labels: Mapping[str, str]) -> list[Instance]:
        return [j for j in self._jobs() if all(j.labels.get(k) == v for k, v in labels.items())]

    def connect(self, instance: Instance) -> SlurmRemote:
        node = instance.data.get("node", "")
        if not node or not instance.workdir:
            raise InfraError(f"Slurm job {instance.id} is not running (no node yet)")
        return SlurmRemote(self.tools, instance.id, instance.workdir, node, instance.run_id)

    # -- reading the queue

    def _jobs(self, *, job_id: str | None = None, name: str | None = None) -> list[Instance]:
        """The live ephemera jobs of the queue (one job, or those with this name). Slurm
        22.05's ``squeue --json`` ignores its filter options: the filtering is done here."""
        out = self.tools.run(["squeue", "--json"])
        if out.returncode != 0:
            raise InfraError(f"squeue on {self.tools.where} failed: {out.why()}")
        try:
            rows = json.loads(out.stdout).get("jobs", [])
        except (ValueError, AttributeError):
            raise InfraError(f"squeue --json on {self.tools.where} did not print JSON") from None
        found = []
        for row in rows if isinstance(rows, list) else []:
            if not isinstance(row, dict) or (job_id and str(row.get("job_id")) != job_id) or (
                    name and row.get("name") != name):
                continue
            instance = self._from_row(row)
            if instance is not None:
                found.append(instance)
        return found

    def _from_row(self, row: Any) -> Instance | None:
        if not isinstance(row, dict):
            return None
        comment, state = row.get("comment"), row.get("job_state")
        if not isinstance(comment, str) or not comment.startswith(COMMENT_PREFIX):
            return None
        if not isinstance(state, str) or state not in LIVE_STATES:
            return None
        try:
            labels = unprefixed(json.loads(comment[len(COMMENT_PREFIX):]))
        except (ValueError, AttributeError, TypeError):
            return None
        run_id = labels.get(LABEL_RUN_ID)
        if not isinstance(run_id, str) or not all(isinstance(v, str) for v in labels.values()):
            return None
        workdir = row.get("current_working_directory") or self._workdir(run_id)
        partition = str(row.get("partition") or "")
        gres = str(row.get("tres_per_node") or "").removeprefix("gres:")
        kind = f"{partition}:{gres}" if gres.startswith("gpu:") else f"{partition}:cpu"
        return self._instance(str(row.get("job_id")), run_id, state, str(row.get("state_reason", "")),
                              labels, str(workdir), kind, partition, str(row.get("nodes") or ""))

    def _instance(self, job_id: str, run_id: str, state: str, reason: str, labels: dict,
                  workdir: str, instance_type: str, partition: str | None, node: str) -> Instance:
        data = {"job_id": job_id, "workdir": workdir, "slurm_state": state, "node": node,
                "login_host": self.tools.login_host or ""}
        if state in QUEUED_STATES:
            data.update(queued="yes", queue_timeout=str(self.settings.slurm_queue_timeout))
            message = f"Slurm job {job_id} {state}" + (
                f" ({reason})" if reason and reason != "None" else "")
            return Instance(provider=self.name, id=job_id, run_id=run_id,
                            state=InstanceState.PENDING, labels=labels, instance_type=instance_type,
                            region=partition, workdir=workdir, message=message, data=data)
        ready = state == "RUNNING" and bool(node)
        return Instance(provider=self.name, id=job_id, run_id=run_id,
                        state=InstanceState.READY if ready else InstanceState.TERMINATING,
                        labels=labels, instance_type=instance_type, region=partition,
                        workdir=workdir, message=f"Slurm job {job_id} {state}", data=data)


def _option(options: Mapping[str, Any] | None, key: str) -> str | None:
    """A value of the job's ``resources.options`` (plain text only)."""
    if not options:
        return None
    value = (options.get("options") or {}).get(key) if "options" in options else options.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9._,-]{1,128}", value):
        raise ConfigError(f"resources.options.{key}: '{value}' is not a Slurm name")
    return value


def _request_text(spec: LaunchSpec) -> str:
    gpus = spec.gpu_count or spec.offer.gpu_count
    return (f"{gpus} x {spec.offer.gpu} GPU" if gpus else "no GPU") + (
        f" on partition {spec.offer.region}" if spec.offer.region else "")


def gpu_memory_table() -> dict[str, float]:
    """Usable GiB of one GPU per model name (upper case), from the built-in catalog."""
    from ephemera.sizing.catalog import builtin_aws_catalog

    table: dict[str, float] = {}
    for offer in builtin_aws_catalog():
        if offer.gpu:
            table.setdefault(offer.gpu.upper(), offer.gpu_memory_gib)
    return table


def parse_sinfo_line(line: str, memory: Mapping[str, float], price_per_gpu_hour: float) -> list[Offer]:
    """Offers of one ``sinfo -o '%R|%G|%c|%m|%a'`` line: for each GPU type of the
    partition's nodes, one offer per GPU count (1..N) with CPUs and memory in proportion,
    and a CPU-only offer. Partitions that are not up, and GPU types the catalog does not
    know, give no GPU offers."""
    parts = [p.strip() for p in line.split("|")]
    if len(parts) != 5 or parts[4] != "up":
        return []
    partition, gres, cpus_text, mem_text = parts[:4]
    try:
        cpus, mem_gib = int(cpus_text.rstrip("+")), int(mem_text.rstrip("+")) / 1024
    except ValueError:
        return []
    source = f"sinfo, partition {partition}"
    offers = [Offer(provider="slurm", instance_type=f"{partition}:cpu", region=partition, gpu=None,
                    gpu_count=0, gpu_memory_gib=0.0, vcpus=cpus, memory_gib=round(mem_gib, 2),
                    price_per_hour=0.0, price_source=source)]
    for item in gres.split(","):
        match = GRES_RE.match(item.strip())
        if not match:
            continue
        kind, total = match["type"], int(match["count"])
        gib = memory.get(kind.upper())
        if gib is None or total < 1:
            continue
        for n in range(1, total + 1):
            offers.append(Offer(
                provider="slurm", instance_type=f"{partition}:gpu:{kind}:{n}", region=partition,
                gpu=kind, gpu_count=n, gpu_memory_gib=gib, vcpus=max(1, cpus * n // total),
                memory_gib=round(mem_gib * n / total, 2), price_per_hour=price_per_gpu_hour * n,
                price_source=source))
    return offers
