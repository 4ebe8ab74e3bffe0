"""Bake a machine image (AMI) with the job's image, weights and compile caches on it.

``ephemera bake job.yaml [--tier T]`` runs the job on an on-demand instance (a one-time
spot instance cannot be stopped) until vLLM answers (weights loaded, compile caches
written), skips the suite, cleans the machine of everything of this run that would act
on an instance booted from the image (dead-man unit and expiry, the run's key, its
directory and container), stops it, makes the AMI, tags it and its snapshots with the
job's bake key, and then terminates the instance as any run does. ``plan`` and ``run``
boot a matching AMI in the offer's region from then on.

``ephemera bake --list`` shows the baked AMIs, ``--prune`` deregisters incomplete ones
and all but the newest per key and region (``--all``: every one) and deletes their
snapshots.

Fault points of a bake run (see ephemera/lifecycle/faults.py), after the run's own:
    bake.clean     the machine was cleaned, the instance is still running
    bake.stopped   the instance is stopped, no image yet
    bake.image     CreateImage returned (the AMI exists, marked pending)
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click


@click.command("bake")
@click.argument("job_file", required=False, type=click.Path(path_type=str))
@click.option("--tier", help="Apply this tier of the job file.")
@click.option("--list", "list_images", is_flag=True, help="List the baked images.")
@click.option("--prune", is_flag=True,
              help="Remove incomplete baked images and all but the newest per key and region.")
@click.option("--all", "prune_all", is_flag=True, help="With --prune: remove every baked image.")
@click.option("--keep", default=1, show_default=True, type=click.IntRange(0, 100),
              help="With --prune: complete images kept per key and region.")
@click.option("--region", "regions", multiple=True,
              help="Regions for --list/--prune (default: aws_regions, else the default region).")
@click.option("--catalog", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Plan the bake run from this catalog CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def command(job_file: str | None, tier: str | None, list_images: bool, prune: bool,
            prune_all: bool, keep: int, regions: tuple[str, ...], catalog: Path | None,
            as_json: bool) -> None:
    """Bake a machine image (AMI) with the job's image, weights and compile caches on it."""
    from ephemera.errors import ConfigError

    if list_images or prune:
        if job_file:
            raise ConfigError("bake: --list and --prune take no job file.")
        _list_or_prune(prune, prune_all, keep, list(regions), as_json)
        return
    if not job_file:
        raise ConfigError("bake: give a job file, or --list or --prune.")
    sys.exit(_bake(job_file, tier, catalog, as_json))


def _aws() -> Any:
    from ephemera.registry import get_provider

    return get_provider("aws")


def _regions(provider: Any, given: list[str]) -> list[str]:
    return given or list(provider.settings.aws_regions) or [provider.default_region()]


def _list_or_prune(prune: bool, everything: bool, keep: int, regions: list[str],
                   as_json: bool) -> None:
    provider = _aws()
    where = _regions(provider, regions)
    if prune:
        images = provider.prune_baked(where, keep=keep, everything=everything)
        verb = "removed"
    else:
        images = provider.baked_images(where)
        verb = "baked"
    if as_json:
        click.echo(json.dumps({verb: images}, indent=2))
        return
    if not images:
        click.echo(f"no baked images {'to remove ' if prune else ''}in {', '.join(where)}")
    for image in images:
        snapshots = ", ".join(image["snapshots"]) or "no snapshots"
        click.echo(f"{verb} {image['id']} {image['region']} {image['state']}/{image['baked'] or '?'} "
                   f"key {image['key']} job {image['job'] or '?'} made {image['created']} "
                   f"({snapshots})")


def _bake(job_file: str, tier: str | None, catalog: Path | None, as_json: bool) -> int:
    from ephemera.errors import ConfigError
    from ephemera.progress import Reporter
    from ephemera.spec.jobfile import load_job
    from ephemera.spec.settings import get_settings

    settings = get_settings()
    loaded = load_job(job_file, tier=tier)
    job = loaded.job
    if job.provider_name(settings.default_provider) != "aws":
        raise ConfigError("bake: machine images are made on the aws provider only "
                          "(resources.provider: aws).")
    loaded = replace(loaded, job=bake_job(job))
    run = _bake_run_class()(loaded, settings=settings, reporter=Reporter(), catalog=catalog)
    result = run.execute()
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "image": run.baked}, indent=2))
    else:
        made = f"baked {run.baked['id']} ({run.baked['region']}, key {run.baked['key']})" \
            if run.baked else "no image was made"
        click.echo(f"{result.status.upper()}: {made}; {result.message}", err=True)
    return result.exit_code if run.baked or result.exit_code else 3


def bake_job(job: Any) -> Any:
    """The job as the bake run runs it: on-demand (a one-time spot instance cannot be
    stopped), no suite preparation or benchmark, and the weights and compile caches in
    the provider's own place outside the run directory ('auto', unless the job names
    one), so they stay on the disk when the run directory is removed."""
    resources = job.resources.model_copy(update={"spot": False})
    cache = job.cache.model_copy(update={"weights": job.cache.weights or "auto",
                                         "compile": job.cache.compile or "auto"})
    suite = job.suite.model_copy(update={"prepare": []})
    return job.model_copy(update={"resources": resources, "cache": cache, "suite": suite,
                                  "benchmark": None})


def _bake_run_class() -> type:
    from ephemera_providers.aws_bake import bake_key, cleanup_script

    from ephemera.lifecycle.controller import Run
    from ephemera.lifecycle.faults import fault_point

    class BakeRun(Run):
        """A run that serves the model (so weights and compile caches land on the disk),
        then makes the image instead of running the suite."""

        baked: dict[str, Any] | None = None
        _collected = False

        def make_plan(self):
            plan = super().make_plan()
            plan.machine_image = None   # always bake from the provider's base image
            plan.notes = [n for n in plan.notes if not n.startswith("boots the baked image")]
            return plan

        def run_suite(self) -> int:
            """In place of the suite (vLLM is up: weights loaded, caches written)."""
            self.collect(budget=60.0)   # the server log, before the run directory goes
            self._collected = True
            with self.phase("bake"):
                self.baked = self._bake()
            return 0

        def collect(self, budget: float, suspect_channel: bool = False) -> None:
            if not self._collected:
                super().collect(budget, suspect_channel)

        def _bake(self) -> dict[str, Any]:
            assert self.instance is not None and self.offer is not None
            key = bake_key(self.job, self.offer.gpu)
            public = Path(self.ssh_key_dir or ".", "id_ed25519.pub")
            script = cleanup_script(self.instance.data.get("ssh_user") or "ubuntu",
                                    public.read_text() if public.is_file() else "",
                                    self.workdir, f"ephemera-{self.run_id}",
                                    **({"boot_dir": self.caps.boot_dir} if self.caps.boot_dir else {}))
            result = self._host_remote().run(script, timeout=min(300.0, self._time_left("bake")))
            if "ephemera-bake-clean" not in result.output_tail:
                from ephemera.errors import RemoteCommandError

                raise RemoteCommandError(f"could not clean the bake instance: "
                                         f"{result.output_tail[-500:]}", exit_status=result.exit_status)
            fault_point("bake.clean")
            tags = {"ephemera:job": self.job.name, "ephemera:owner": self.settings.owner,
                    "Name": f"ephemera bake {self.job.name}"}
            return self.provider.bake_image(self.instance, key, tags,
                                            seconds=self._time_left("bake"),
                                            log=self._log, step=fault_point)

    return BakeRun
