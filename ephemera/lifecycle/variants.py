"""A/B variants in one job: plan where they run, run them, compare them.

``variants`` are named overrides deep-merged over the job (like tiers; the job's tier
first). Each variant is checked as a whole job, with the file's line numbers. Two
placements:

- ``same-machine``: one instance for every variant, one after another (one boot, one
  image pull). Possible when the variants share the provider, the image and the
  resources, and one offer fits them all. ``SharedRun`` drives the controller's ``Run``
  over the instance: for each variant its own work directory on the instance, its own
  server, suite, benchmark and artifacts subdirectory; the server is stopped before the
  next variant starts. A signal or failure in a variant tears the instance down; the
  variants finished before it keep their results.
- ``parallel``: one instance per variant at once. Each variant is a whole
  ``ephemera run`` of its own in a child process (with every guarantee of a single run:
  its own state file, teardown and history row); signals reach every child.

``auto`` takes the cheaper of the two (upper bounds: price times the timeouts), unless
``compare.deadline`` needs parallel or the variants cannot share a machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ephemera.errors import ConfigError
from ephemera.sizing.plan import offer_dict, plan_job
from ephemera.spec.jobfile import (
    JobFileError,
    LoadedJob,
    Problem,
    _resolve_local_model,
    _validate,
    deep_merge,
)

_NOT_MERGED = ("variants", "compare", "tiers")


@dataclass
class Variant:
    name: str
    loaded: LoadedJob
    compare: Any = None          # the job's compare section (CompareSpec or None)

    @property
    def job(self) -> Any:
        return self.loaded.job


def _masked(value: Any, secrets: tuple[str, ...]) -> Any:
    """The document with values taken from the environment shown as ***."""
    if isinstance(value, dict):
        return {k: _masked(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
    return value


def variant_names(loaded: LoadedJob) -> list[str]:
    """The variants, the baseline first."""
    job = loaded.job
    names = list(job.variants)
    base = job.compare.baseline if job.compare is not None else None
    if base in names:
        names.remove(base)
        names.insert(0, base)
    return names


def load_variants(loaded: LoadedJob, *, check_provider: bool = True) -> list[Variant]:
    """Every variant as a whole job. Raises JobFileError naming each problem's line."""
    data = {k: v for k, v in loaded.data.items() if k not in _NOT_MERGED}
    name = str(loaded.path)
    problems: list[Problem] = []
    out = []
    for variant in variant_names(loaded):
        override = loaded.data["variants"].get(variant) or {}
        merged = deep_merge(data, override)
        merged["name"] = f"{loaded.job.name}-{variant}"
        locations = dict(loaded.locations)
        prefix = ("variants", variant)
        for path, loc in loaded.locations.items():
            if path[:2] == prefix and len(path) > 2:
                locations[path[2:]] = loc
        job, found = _validate(merged, locations, loaded.base_dir, check_provider,
                               prefix=f"[variant {variant}] ",
                               shown=_masked(merged, loaded.substituted))
        problems += found
        if job is not None and not found:
            job = _resolve_local_model(job, loaded.base_dir)
            out.append(Variant(variant, replace(loaded, job=job, data=merged, locations=locations),
                               loaded.job.compare))
    if problems:
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise JobFileError(name, problems)
    return out


# ---- placement ---------------------------------------------------------------------

def offer_key(offer: Any) -> tuple:
    return (offer.provider, offer.instance_type, offer.region, offer.spot)


@dataclass
class Placement:
    choice: str                                 # same-machine | parallel
    asked: str
    reason: str
    plans: dict[str, Any]                       # variant -> its own Plan (parallel)
    parallel_cost_usd: float
    parallel_seconds: float
    shared: Any = None                          # the same-machine Plan, when possible
    shared_tp: dict[str, dict[tuple, int]] = field(default_factory=dict)
    same_cost_usd: float | None = None
    same_seconds: float | None = None
    same_not_possible: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.choice, "asked": self.asked, "reason": self.reason,
            "same_machine": None if self.shared is None else {
                "offer": offer_dict(self.shared.offer), "expected_cost_usd": round(self.same_cost_usd or 0, 4),
                "seconds_at_most": self.same_seconds},
            "same_machine_not_possible": self.same_not_possible,
            "parallel": {"variants": {n: p.to_dict() for n, p in self.plans.items()},
                         "expected_cost_usd": round(self.parallel_cost_usd, 4),
                         "seconds_at_most": self.parallel_seconds},
        }


def _shared_plan(variants: list[Variant], plans: dict[str, Any],
                 provider: str) -> tuple[Any, dict[str, dict[tuple, int]], str | None]:
    first = variants[0].job
    for v in variants[1:]:
        for what, mine, theirs in (("image", first.image, v.job.image),
                                   ("resources", first.resources, v.job.resources)):
            if mine != theirs:
                return None, {}, (f"variant {v.name} has another {what} than {variants[0].name}; "
                                  "one machine runs one image and one set of resources")
    fitting: dict[str, dict[tuple, Any]] = {}
    for v in variants:
        plan = plans[v.name]
        cands = {offer_key(plan.offer): (plan.offer, plan.tensor_parallel_size)}
        for c in plan.runners_up:
            cands.setdefault(offer_key(c.offer), (c.offer, c.tensor_parallel_size))
        fitting[v.name] = cands
    common = set.intersection(*(set(c) for c in fitting.values()))
    if not common:
        return None, {}, "no single offer fits every variant"
    ranked = sorted(common, key=lambda k: (fitting[variants[0].name][k][0].price_per_hour, k[1]))
    tps = {v.name: {k: fitting[v.name][k][1] for k in ranked} for v in variants}
    seconds = sum(v.job.timeout for v in variants)
    best = fitting[variants[0].name][ranked[0]][0]
    base = plans[variants[0].name]
    runners = [c for c in base.runners_up if offer_key(c.offer) in common and c.offer is not best]
    shared = replace(base, offer=best, tensor_parallel_size=tps[variants[0].name][ranked[0]],
                     runners_up=runners, expected_cost_usd=best.price_per_hour * seconds / 3600,
                     timeout_seconds=seconds, disk_gib=max(p.disk_gib for p in plans.values()),
                     checkpoint_gib=sum(p.checkpoint_gib for p in plans.values()))
    return shared, tps, None


def plan_placement(variants: list[Variant], *, catalog: Path | None = None,
                   provider_name: str | None = None) -> Placement:
    plans = {v.name: plan_job(v.job, catalog=catalog, provider_name=provider_name) for v in variants}
    spec = variants[0].compare
    asked = spec.placement if spec is not None else "auto"
    deadline = spec.deadline if spec is not None else None
    providers = {provider_name or v.job.resources.provider for v in variants}
    parallel_cost = sum(p.expected_cost_usd for p in plans.values())
    parallel_seconds = max(v.job.timeout for v in variants)
    shared, tps, why = (None, {}, "the variants use different providers") if len(providers) > 1 \
        else _shared_plan(variants, plans, next(iter(providers)) or "")
    same_cost = shared.expected_cost_usd if shared is not None else None
    same_seconds = shared.timeout_seconds if shared is not None else None
    placement = Placement("parallel", asked, "", plans, parallel_cost, parallel_seconds,
                          shared, tps, same_cost, same_seconds, why)
    if asked == "same-machine":
        if shared is None:
            raise ConfigError(f"compare.placement: same-machine is not possible: {why}",
                              hint="Use placement: parallel (or auto).")
        placement.choice, placement.reason = "same-machine", "asked for"
    elif asked == "parallel":
        placement.reason = "asked for"
    elif shared is None:
        placement.reason = f"same-machine is not possible: {why}"
    elif deadline is not None and same_seconds > deadline >= parallel_seconds:
        placement.reason = (f"one after another could take {same_seconds / 60:g} min, more than "
                            f"the deadline of {deadline / 60:g} min")
    elif same_cost <= parallel_cost + 1e-9:
        placement.choice = "same-machine"
        placement.reason = (f"cheaper or equal (${same_cost:.4f} vs ${parallel_cost:.4f} at most) "
                            f"with one boot and one image pull instead of {len(variants)}")
    else:
        placement.reason = f"cheaper (${parallel_cost:.4f} vs ${same_cost:.4f} at most)"
    return placement


def placement_lines(placement: Placement) -> list[str]:
    lines = []
    for name, plan in placement.plans.items():
        o = plan.offer
        lines.append(f"variant {name}: {o.provider}/{o.instance_type} ({o.gpu_count} x {o.gpu or 'CPU'}), "
                     f"tensor parallel {plan.tensor_parallel_size}, ${o.price_per_hour:.4g}/h")
    lines.append(f"parallel: one instance per variant, at most ${placement.parallel_cost_usd:.4f} "
                 f"and {placement.parallel_seconds / 60:g} min")
    if placement.shared is not None:
        o = placement.shared.offer
        lines.append(f"same-machine: {o.provider}/{o.instance_type} for all, one after another, "
                     f"at most ${placement.same_cost_usd:.4f} and {placement.same_seconds / 60:g} min")
    else:
        lines.append(f"same-machine: not possible ({placement.same_not_possible})")
    lines.append(f"placement: {placement.choice} ({placement.reason})")
    return lines


def one_variant(loaded: LoadedJob, name: str, *, check_provider: bool = True) -> LoadedJob:
    """The job of one variant (for a parallel A/B run's child)."""
    for variant in load_variants(loaded, check_provider=check_provider):
        if variant.name == name:
            return variant.loaded
    known = ", ".join(loaded.job.variants) or "none defined"
    raise ConfigError(f"--variant: '{name}' is not a variant of {loaded.path} (variants: {known})")
