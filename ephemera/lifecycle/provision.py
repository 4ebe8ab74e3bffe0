"""Provision: launch the planned offer (falling back to the plan's runners-up when a
provider has no capacity or quota) and wait until the instance is reachable.

Providers never wait; the waiting is here, bounded by the phase deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ephemera.errors import InfraError, NoCapacityError, PhaseTimeoutError, QuotaError
from ephemera.provider import Instance, InstanceState, LaunchSpec, Offer, Provider

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
