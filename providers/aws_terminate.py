"""Ending a run's EC2 instance: TerminateInstances (sent again while the instance still
shows up alive), confirmation, and the deletion of its security group and key pair
once it is terminated.

A mixin of :class:`ephemera_providers.aws.AWSProvider`.
"""

from __future__ import annotations

from typing import Any

from ephemera_providers.aws_errors import (
    Kind,
    classify,
    to_ephemera_error,
)

from ephemera.provider import (
    Instance,
    InstanceState,
)

# How often poll sends TerminateInstances again to an instance that is still alive.
MAX_TERMINATE_RESENDS = 20


class Termination:
    """``terminate``, ``terminate_confirmed`` and ``cleanup``."""

    settings: Any

    def terminate(self, instance: Instance) -> None:
        """Ask for termination and return (no waiting). Already gone is a success. An
        instance AWS does not know yet (right after RunInstances) is not taken as gone:
        ``poll`` sends TerminateInstances again while it shows up alive, and only says
        TERMINATED once AWS shows it terminated (or still does not know it after the
        grace period). The group and key pair are deleted at once when the instance is
        already terminated, else by ``terminate_confirmed``."""
        region = self._region_of(instance)
        kind = instance.data.get("kind")
        if kind == "security-group":
            self._delete_group(region, instance.id)
            return
        if kind == "key-pair":
            self._delete_key(region, instance.id)
            return
        self._send_terminate(instance, region)
        self.terminate_confirmed(instance)

    def _send_terminate(self, instance: Instance, region: str) -> None:
        from botocore.exceptions import ClientError

        self._terminate_sent[instance.id] = self._terminate_sent.get(instance.id, 0) + 1
        try:
            self._call_raw("ec2", region, "terminate_instances", InstanceIds=[instance.id])
        except ClientError as exc:
            if classify(exc) is not Kind.NOT_FOUND:
                raise to_ephemera_error(exc, "TerminateInstances", region) from exc

    def _terminate_again(self, instance: Instance, region: str, state: str) -> Instance:
        sent = self._terminate_sent.get(instance.id, 0)
        if sent > MAX_TERMINATE_RESENDS:
            return instance.evolve(state=InstanceState.TERMINATING, message=(
                f"still {state} after {sent} TerminateInstances calls"))
        self._send_terminate(instance, region)
        return instance.evolve(state=InstanceState.TERMINATING,
                               message=f"{state}; TerminateInstances sent again ({sent + 1})")

    def terminate_confirmed(self, instance: Instance) -> bool:
        """True once the instance is ``terminated`` (or unknown to AWS past the grace
        period after launch) and the group and key pair made for it are gone. One look,
        no waiting: call it again until True."""
        return self.poll(instance).state is InstanceState.TERMINATED

    def cleanup(self, instance: Instance) -> bool:
        """Delete the run's security group and key pair; False while the group is still
        held by the instance's network interface (try again later)."""
        region = self._region_of(instance)
        done = True
        if instance.data.get("group_owned") and instance.data.get("security_group_id"):
            done = self._delete_group(region, instance.data["security_group_id"])
        if instance.data.get("key_owned") and instance.data.get("key_name"):
            done = self._delete_key(region, instance.data["key_name"]) and done
        return done

    def _after_termination(self, instance: Instance, reason: str) -> Instance:
        if self.cleanup(instance):
            return instance.evolve(state=InstanceState.TERMINATED, endpoint=None, message=reason)
        return instance.evolve(state=InstanceState.TERMINATING,
                               message=f"{reason}; security group still in use, retrying")

    # ----------------------------------------------------------------- connect
