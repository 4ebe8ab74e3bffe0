"""Provision: launch the planned offer (falling back to the plan's runners-up when a
provider has no capacity or quota) and wait until the instance is reachable.

Providers never wait; the waiting is here, bounded by the phase deadline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ephemera.lifecycle import caches, weights
from ephemera.transport.ssh import generate_keypair

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run



import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from ephemera.errors import (
    InfraError,
    NoCapacityError,
    PhaseTimeoutError,
    QuotaError,
)
from ephemera.lifecycle.faults import fault_point
from ephemera.lifecycle.state import RunState
from ephemera.provider import (
    Instance,
    InstanceState,
    LaunchSpec,
    Offer,
    Provider,
    make_labels,
)

Log = Callable[[str], None]


def launch_with_failover(provider: Provider, offers: list[Offer],
                         make_spec: Callable[[Offer], LaunchSpec],
                         *, log: Log, before_launch: Callable[[LaunchSpec], None] | None = None,
                         ) -> tuple[Instance, Offer]:
    """Try ``offers`` in order (the plan's choice first). Capacity and quota errors move
    on to the next offer; anything else stops at once. ``before_launch`` runs right
    before each launch call (the controller writes its state file there)."""
    reasons = []
    for offer in offers:
        spec = make_spec(offer)
        if before_launch is not None:
            before_launch(spec)
        try:
            instance = provider.launch(spec)
            return instance, offer
        except (NoCapacityError, QuotaError) as exc:
            reasons.append(f"{offer.instance_type} ({offer.region or '-'}): {exc}")
            log(f"{offer.instance_type}: {exc.kind}: {exc}; trying the next offer")
    raise NoCapacityError("no offer of the plan could be launched: " + "; ".join(reasons),
                          hint="Raise the price cap, allow more regions or GPU types, or retry later.")


def wait_ready(provider: Provider, instance: Instance, *, deadline: float, phase_seconds: float,
               log: Log, poll_interval: float = 0.5) -> Instance:
    """Poll until READY. FAILED or TERMINATED stop the wait with the provider's reason."""
    interval = poll_interval
    last_state = None
    while True:
        instance = provider.poll(instance)
        if instance.state != last_state:
            log(f"instance {instance.id}: {instance.state.value}"
                + (f" ({instance.message})" if instance.message else ""))
            last_state = instance.state
        if instance.state == InstanceState.READY:
            return instance
        if instance.state in (InstanceState.FAILED, InstanceState.TERMINATED):
            raise InfraError(f"instance {instance.id} {instance.state.value} before it became ready"
                             + (f": {instance.message}" if instance.message else ""))
        if time.monotonic() + interval > deadline:
            raise PhaseTimeoutError("boot", phase_seconds,
                                    f"instance {instance.id} was not ready within {phase_seconds:.0f}s "
                                    f"(last state: {instance.state.value})")
        time.sleep(interval)
        interval = min(interval * 1.3, 5.0)


def launch_spec(run: Run, offer: Offer, image: str, public_key: str | None,
                 private_key: str | None) -> LaunchSpec:
    expires_at = (datetime.now(UTC) + timedelta(seconds=run.job.timeout)
                  + timedelta(seconds=run.settings.expiry_grace_seconds))
    labels = make_labels(run.run_id, run.job.name, run.settings.owner, expires_at)
    labels.update({k: v for k, v in run.job.resources.tags.items() if k not in labels})
    tp = run.plan.tensor_parallel_size if run.plan is not None else 1
    options = run.job.resources.model_dump(mode="json")
    if run.plan is not None and run.plan.machine_image:   # a baked image the plan found
        options["machine_image"] = dict(run.plan.machine_image)
    boot_weights = weights.boot_request(run)
    if boot_weights:   # a hub model the machine may start downloading at boot
        options["boot_weights"] = boot_weights
    mounts = weights.docker_mounts(run) + [v for v in [caches.docker_volume(run)] if v]
    mounted = caches.model_mount(run, run.model_dir) if run.model_dir is not None else None
    if mounted is not None:
        mounts.append(mounted[0])
        run.mounted_models[str(run.model_dir)] = mounted[1]
    if mounts:   # the docker provider's bind mounts and volumes (model, hub and compile caches)
        options["docker"] = {**options.get("docker", {}), "mounts": mounts}
    return LaunchSpec(
        run_id=run.run_id, job_name=run.job.name, offer=offer, image=image, labels=labels,
        expires_at=expires_at, ssh_public_key=public_key, ssh_private_key_path=private_key,
        disk_gib=run.plan.disk_gib, gpu_count=max(tp, offer.gpu_count) if offer.gpu_count else 0,
        ports=(run.job.server.port or 8000,), env={}, options=options,
    )


def provision(run: Run, image: str) -> None:
    assert run.provider is not None
    public_key = private_key = None
    if run.caps.needs_ssh_key:
        run.ssh_key_dir = run.settings.state_dir / "keys" / run.run_id
        private_path, public_key = generate_keypair(run.ssh_key_dir)
        private_key = str(private_path)
    assert run.plan is not None
    offers = [run.plan.offer] + [c.offer for c in run.plan.runners_up]

    def before_launch(spec: LaunchSpec) -> None:
        if run.state is None:
            run.state = RunState(run_id=run.run_id, job=run.job.name, provider=run.provider_name,
                                  labels=dict(spec.labels), expires_at=spec.expires_at,
                                  ssh_key_path=private_key, artifacts_dir=str(run.artifacts_dir))
        else:
            run.state.labels = dict(spec.labels)
            run.state.expires_at = spec.expires_at
        run._write_state("launching")

    with run.phase("provision", f"{run.provider_name} {run.plan.offer.instance_type}"):
        with run._deferred_signals():
            run.launched_at = datetime.now(UTC)
            run.instance, run.offer = launch_with_failover(
                run.provider, offers, lambda offer: run._launch_spec(offer, image, public_key, private_key),
                log=run._log, before_launch=before_launch)
            run._write_state("active")
        run._log(f"launched {run.instance.id} ({run.offer.instance_type}, "
                  f"{run.offer.region or 'local'}); state file: {run.settings.state_dir / 'runs'}")
        if run.instance.message:   # e.g. a fallback from spot to on-demand, and why
            run._log(f"{run.instance.id}: {run.instance.message}")
    if run.instance.data.get("queued") == "yes":
        run.wait_queue()
    deadline, seconds, by_job = run.phase_deadline("boot", run.job.resources.boot_timeout)
    with run.phase("boot"):
        try:
            run.instance = wait_ready(run.provider, run.instance, deadline=deadline,
                                       phase_seconds=seconds, log=run._log)
        except PhaseTimeoutError as exc:
            raise run._timeout_error("boot", seconds, by_job, exc.message) from None
        run._write_state("active")
        fault_point("boot")


def wait_queue(run: Run) -> None:
    """A batch scheduler's queue (the instance says ``queued``): the time spent there
    is shown with the scheduler's reason, bounded by the provider's queue timeout (and
    the job's deadline) and not billed: billing starts when the wait ends."""

    assert run.provider is not None and run.instance is not None
    try:
        limit = float(run.instance.data.get("queue_timeout") or 0) or None
    except ValueError:
        limit = None
    deadline, seconds, by_job = run.phase_deadline("queue", limit)
    started = time.monotonic()
    try:
        with run.phase("queue", run.instance.message):
            while run.instance.state is InstanceState.PENDING:
                if time.monotonic() + 2.0 > deadline:
                    raise run._timeout_error(
                        "queue", seconds, by_job, f"{run.instance.message} after "
                        f"{time.monotonic() - started:.0f}s; cancelled")
                time.sleep(2.0)
                run.instance = run.provider.poll(run.instance)
                run.reporter.progress(f"queued {time.monotonic() - started:.0f}s: "
                                       f"{run.instance.message}")
            run._log(f"{run.instance.id} left the queue after "
                      f"{time.monotonic() - started:.0f}s ({run.instance.message})")
    finally:
        run.launched_at = datetime.now(UTC)
