"""Baked machine images: an AMI made from a bake run's instance (the job's image pulled,
the weights and compile caches in place), found again by the job's bake key.

The key (:func:`bake_key`) is a hash of what makes the baked disk useful to a job: the
model and its revision, precision and quantization, the job's image (which fixes the
vLLM version), the GPU type, and the arguments vLLM's compile caches depend on
(``max_model_len``, the server's extra arguments). An AMI is tagged with it, with
``ephemera:baked = pending`` while it is being made and ``complete`` once it is available
and its snapshots are tagged; only complete AMIs are used.

Before the image is taken, the bake run's instance is cleaned of everything that would
act on an instance booted from the AMI (:func:`cleanup_script`): the dead-man unit and
script with the bake run's expiry (else every new instance powers itself off at that
past time), the boot-time pull markers, the run's public key in ``authorized_keys``, the
run's container and directory, and cloud-init's record of this boot. The bake run's own
instance stays guarded: its scheduled ``shutdown`` and the dead-man process already
running are not touched (neither is part of the disk), and the instance is stopped right
after.

A volume made from a snapshot is filled lazily from S3 on first read, so a launch from
a baked AMI asks for a volume initialization rate (:data:`INIT_RATE_MIB_S`) on its root
volume: the blocks arrive at that rate instead of at the pace of the first reads.

A mixin of :class:`ephemera_providers.aws.AWSProvider`.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ephemera_providers.aws_common import (
    TAG_PREFIX,
    entries,
    from_tags,
    mapping,
    resource_id,
    shown,
    text,
)
from ephemera_providers.aws_errors import Kind, classify, to_ephemera_error
from ephemera_providers.aws_userdata import BOOT_DIR, DEADMAN_SCRIPT, DEADMAN_UNIT

from ephemera.errors import InfraError

KEY_TAG = TAG_PREFIX + "bake-key"
BAKED_TAG = TAG_PREFIX + "baked"
FROM_TAG = TAG_PREFIX + "baked-from"
# The volume initialization rate asked for on a baked AMI's root volume (MiB/s; EBS
# accepts 100 to 300, billed per GiB initialised).
INIT_RATE_MIB_S = 300
# Room left free on a baked AMI's root volume (the image and weights are already on it).
BAKED_SLACK_GIB = 20
KEY_VERSION = 1
STOP_SECONDS = 600.0
IMAGE_SECONDS = 3600.0


def bake_key(job: Any, gpu: str | None) -> str:
    """The key a baked AMI is found by, for ``job`` on a GPU of type ``gpu``."""
    model, server = job.model, job.server
    fields = {
        "v": KEY_VERSION, "model": model.id, "revision": model.revision,
        "precision": model.precision, "quantization": model.quantization,
        "kv_cache_dtype": model.kv_cache_dtype, "max_model_len": model.max_model_len,
        "image": job.image, "gpu": (gpu or "cpu").lower(), "args": list(server.args),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def cleanup_script(login_user: str, public_key: str, workdir: str, container: str,
                   boot_dir: str = BOOT_DIR) -> str:
    """Shell run on the bake instance (as the login user, root through ``sudo -n``) right
    before it is stopped and imaged (``boot_dir``: where its boot work left its state).
    Every step tolerates what is already gone."""
    key = public_key.split()[1] if len(public_key.split()) > 1 else public_key
    user = shlex.quote(login_user)
    quoted_key = shlex.quote(key)
    return f"""set -u
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi
$SUDO systemctl disable ephemera-deadman.service >/dev/null 2>&1
$SUDO rm -f {DEADMAN_UNIT} /etc/systemd/system/multi-user.target.wants/ephemera-deadman.service \
    {DEADMAN_SCRIPT}
$SUDO systemctl daemon-reload >/dev/null 2>&1
$SUDO rm -rf {shlex.quote(boot_dir)}
docker rm -f {shlex.quote(container)} >/dev/null 2>&1 || $SUDO docker rm -f \
    {shlex.quote(container)} >/dev/null 2>&1
rm -rf {shlex.quote(workdir)}
for f in ~{user}/.ssh/authorized_keys /root/.ssh/authorized_keys; do
    $SUDO sh -c 'f=$1; k=$2; [ -f "$f" ] || exit 0; grep -vF -- "$k" "$f" > "$f.ephemera" ; \
        cat "$f.ephemera" > "$f"; rm -f "$f.ephemera"' sh "$f" {quoted_key} 2>/dev/null
done
$SUDO cloud-init clean --logs >/dev/null 2>&1
sync
echo ephemera-bake-clean
"""


def image_name(key: str, run_id: str) -> str:
    return f"ephemera-bake-{key[:12]}-{run_id}"[:128]


def describe(raw: Mapping[str, Any], region: str) -> dict[str, Any]:
    """One baked AMI as ``bake --list`` and the plan show it."""
    tags = from_tags(raw.get("Tags"))
    snapshots = [text(mapping(d.get("Ebs")).get("SnapshotId"))
                 for d in entries(raw, "BlockDeviceMappings", f"DescribeImages in {region}")]
    return {"id": resource_id(raw, "ImageId", f"DescribeImages in {region}"), "region": region,
            "name": shown(text(raw.get("Name"))), "state": shown(text(raw.get("State"))),
            "created": shown(text(raw.get("CreationDate"))), "key": tags.get(KEY_TAG, ""),
            "baked": tags.get(BAKED_TAG, ""), "from_run": tags.get(FROM_TAG, ""),
            "job": tags.get("job", ""), "owner": tags.get("owner", ""),
            "snapshots": [s for s in snapshots if s]}


class Baking:
    """Making, finding, listing and pruning baked AMIs (mixed into the provider)."""

    settings: Any
    session: Any

    def _call(self, service: str, region: str, operation: str, **params: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    def _call_raw(self, service: str, region: str, operation: str, **params: Any) -> Any:
        raise NotImplementedError  # pragma: no cover - provided by the provider

    # ------------------------------------------------------------------ finding

    def baked_images(self, regions: Iterable[str], key: str | None = None, *,
                     quick: bool = False) -> list[dict[str, Any]]:
        """This account's baked AMIs in ``regions`` (with ``key``: only those), newest
        first. ``quick``: one short try per region (a plan must not wait minutes)."""
        found: list[dict[str, Any]] = []
        for region in regions:
            filters = [{"Name": "tag-key", "Values": [KEY_TAG]}]
            if key:
                filters = [{"Name": f"tag:{KEY_TAG}", "Values": [key]}]
            if quick:
                reply = self._quick_client(region).describe_images(Owners=["self"], Filters=filters)
            else:
                reply = self._call("ec2", region, "describe_images", Owners=["self"],
                                   Filters=filters)
            found += [describe(raw, region)
                      for raw in entries(reply, "Images", f"DescribeImages in {region}")]
        return sorted(found, key=lambda image: image["created"], reverse=True)

    def machine_image_for(self, job: Any, offer: Any) -> dict[str, Any] | None:
        """The newest complete baked AMI for ``job`` in the offer's region, or None. A job
        that names its own AMI (resources.aws.ami) never gets a baked one."""
        if job.resources.aws.ami or offer.region is None:
            return None
        if self.session.get_credentials() is None:
            return None
        key = bake_key(job, offer.gpu)
        for image in self.baked_images([offer.region], key, quick=True):
            if image["baked"] == "complete" and image["state"] == "available":
                return image
        return None

    def _quick_client(self, region: str) -> Any:
        from botocore.config import Config

        config = Config(connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 1},
                        user_agent_extra="ephemera")
        return self.session.client("ec2", region_name=region, config=config)

    # ------------------------------------------------------------------- baking

    def bake_image(self, instance: Any, key: str, tags: Mapping[str, str], *,
                   seconds: float = IMAGE_SECONDS, log: Callable[[str], None] = print,
                   step: Callable[[str], None] = lambda _point: None) -> dict[str, Any]:
        """Stop the (already cleaned) instance, make an AMI of it tagged with ``key`` and
        ``tags``, wait until it is available, tag its snapshots and mark it complete.
        ``step`` is called after each step (the fault points of the bake run)."""
        region = instance.region or instance.data.get("region") or self.default_region()
        self._call("ec2", region, "stop_instances", InstanceIds=[instance.id])
        self._wait_instance(region, instance.id, "stopped", min(seconds, STOP_SECONDS), log)
        step("bake.stopped")
        own_tags = [{"Key": k, "Value": str(v)} for k, v in tags.items()]
        own_tags += [{"Key": KEY_TAG, "Value": key}, {"Key": FROM_TAG, "Value": instance.run_id}]
        image_tags = [*own_tags, {"Key": BAKED_TAG, "Value": "pending"}]
        reply = self._call("ec2", region, "create_image", InstanceId=instance.id,
                           Name=image_name(key, instance.run_id),
                           Description=f"ephemera baked image, key {key}, run {instance.run_id}",
                           TagSpecifications=[{"ResourceType": "image", "Tags": image_tags}])
        ami = resource_id(reply, "ImageId", f"CreateImage in {region}")
        log(f"image {ami} is being made from {instance.id}")
        step("bake.image")
        raw = self._wait_image(region, ami, seconds, log)
        image = describe(raw, region)
        if image["snapshots"]:
            # Tagged now: CreateImage with snapshot TagSpecifications is refused by some
            # endpoints, and the snapshots are what is billed.
            self._call("ec2", region, "create_tags", Resources=image["snapshots"], Tags=own_tags)
        self._call("ec2", region, "create_tags", Resources=[ami],
                   Tags=[{"Key": BAKED_TAG, "Value": "complete"}])
        return {**image, "baked": "complete", "key": key}

    def _wait_instance(self, region: str, instance_id: str, wanted: str, seconds: float,
                       log: Callable[[str], None]) -> None:
        deadline = time.monotonic() + seconds
        while True:
            reply = self._call("ec2", region, "describe_instances", InstanceIds=[instance_id])
            states = [text(mapping(i.get("State")).get("Name"))
                      for r in entries(reply, "Reservations", "DescribeInstances")
                      for i in entries(r, "Instances", "DescribeInstances")]
            if wanted in states:
                return
            if time.monotonic() > deadline:
                raise InfraError(f"instance {instance_id} was not {wanted} within {seconds:.0f}s "
                                 f"(state {', '.join(states) or 'unknown'}).")
            log(f"{instance_id}: {', '.join(states) or 'unknown'}, waiting for {wanted}")
            time.sleep(3.0)

    def _wait_image(self, region: str, ami: str, seconds: float,
                    log: Callable[[str], None]) -> Mapping[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            images = entries(self._call("ec2", region, "describe_images", ImageIds=[ami]),
                             "Images", f"DescribeImages in {region}")
            state = text(images[0].get("State")) if images else ""
            if state == "available":
                return images[0]
            if state in ("failed", "invalid", "deregistered", "error"):
                raise InfraError(f"AMI {ami} ended in state {state}: "
                                 f"{shown(mapping(images[0].get('StateReason')).get('Message'))}")
            if time.monotonic() > deadline:
                raise InfraError(f"AMI {ami} was not available within {seconds:.0f}s (state "
                                 f"{state or 'unknown'}); `ephemera bake --prune` removes it.")
            log(f"{ami}: {state or 'unknown'}, waiting until it is available")
            time.sleep(10.0)

    # ------------------------------------------------------------------ pruning

    def prune_baked(self, regions: Iterable[str], *, keep: int = 1,
                    everything: bool = False) -> list[dict[str, Any]]:
        """Deregister baked AMIs and delete their snapshots: all of them with
        ``everything``, else the incomplete ones and all but the ``keep`` newest complete
        ones per key and region. Returns what was removed."""
        removed = []
        kept: dict[tuple[str, str], int] = {}
        for image in self.baked_images(regions):
            slot = (image["region"], image["key"])
            if not everything and image["baked"] == "complete" and image["state"] == "available":
                kept[slot] = kept.get(slot, 0) + 1
                if kept[slot] <= keep:
                    continue
            self.remove_baked(image)
            removed.append(image)
        return removed

    def remove_baked(self, image: Mapping[str, Any]) -> None:
        """DeregisterImage, then DeleteSnapshot for each of its snapshots (deregistering
        does not delete them, and they are what is billed)."""
        from botocore.exceptions import ClientError

        region = image["region"]
        try:
            self._call_raw("ec2", region, "deregister_image", ImageId=image["id"])
        except ClientError as exc:
            if classify(exc) not in (Kind.NOT_FOUND, Kind.INVALID):
                raise to_ephemera_error(exc, "DeregisterImage", region) from exc
        for snapshot in image["snapshots"]:
            try:
                self._call_raw("ec2", region, "delete_snapshot", SnapshotId=snapshot)
            except ClientError as exc:
                if classify(exc) not in (Kind.NOT_FOUND, Kind.INVALID):
                    raise to_ephemera_error(exc, "DeleteSnapshot", region) from exc
