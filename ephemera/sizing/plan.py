"""Pick the cheapest machine that can serve a job's model: what ``plan`` prints and
``run`` launches.

For every offer the planner first applies the job's constraints (provider, instance
type, GPU model, regions, spot, price cap), then tries the tensor-parallel sizes vLLM
accepts (divisors of the attention heads that split or replicate the KV heads, at
most the offer's GPU count; smallest first, so a model that fits on one GPU uses
one) and keeps the offer when every GPU fits (see ``ephemera.sizing.estimate``). The
cheapest per hour wins; ties go to the offer with the most spare KV cache.

Before memory, an offer must have a GPU that vLLM can run the job on (see
:class:`GpuNeeds`): compute capability 7.5 or newer at all, 8.0 for bf16, the
quantization method's own minimum; FP8 weights below 8.9 run weight-only and the plan
says so in its notes.

CPU-only offers (no GPU, as the local and docker providers give on a machine without
one) fit when the weights, one ``max_model_len`` request of KV cache and a fixed
runtime overhead of CPU_OVERHEAD_GIB fit in ``gpu_memory_utilization`` x the host's
RAM. Tensor parallelism is 1 there.

The plan also sizes the machine's disk for the job (:func:`disk_gib_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ephemera.errors import NoFittingOfferError
from ephemera.provider import Offer, OfferRequest
from ephemera.sizing.catalog import load_catalog, offer_capability
from ephemera.sizing.estimate import (
    GIB,
    Estimate,
    estimate_shape,
    valid_tensor_parallel_sizes,
    vllm_defaults,
)
from ephemera.sizing.gpu_needs import arg_value, gpu_needs
from ephemera.sizing.model_shape import Shape, analyse
from ephemera.sizing.modelconfig import ModelInfo, load_model
from ephemera.spec.job import Job
from ephemera.spec.settings import get_settings

CPU_OVERHEAD_GIB = 1.5     # Python, torch and vLLM's own buffers on a CPU host
TABLE_ROWS = 15
RUNNERS_UP_SHOWN = 10      # the JSON lists this many runners-up (and counts the rest)

# Disk for the job besides the machine's own system (see disk_gib_for).
IMAGE_DISK_GIB = 30        # a vLLM image unpacked (vllm/vllm-openai: about 20 to 29 GB in
                           # 2025-26 releases) plus its compressed layers while they unpack
DISK_SLACK_GIB = 10        # Hugging Face cache bookkeeping, logs, the suite and its results
DISK_FLOOR_GIB = 50        # never less: estimates of small or unknown models are rough


@dataclass(frozen=True)
class Rejection:
    offer: Offer
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"offer": offer_dict(self.offer), "reason": self.reason}


@dataclass(frozen=True)
class Candidate:
    """An offer that fits, with the tensor-parallel size and the room left."""

    offer: Offer
    tensor_parallel_size: int
    estimate: Estimate
    kv_free_gib_per_gpu: float       # KV cache room per GPU (or host) after the rest
    headroom_gib: float              # spare room over one max_model_len request, all GPUs
    notes: tuple[str, ...] = ()      # how vLLM will run the job on this GPU, when it matters

    def to_dict(self) -> dict[str, Any]:
        return {"offer": offer_dict(self.offer), "tensor_parallel_size": self.tensor_parallel_size,
                "kv_free_gib_per_gpu": round(self.kv_free_gib_per_gpu, 3),
                "headroom_gib": round(self.headroom_gib, 3)}


@dataclass
class Plan:
    offer: Offer
    tensor_parallel_size: int
    estimate: Estimate
    expected_cost_usd: float         # price x the job's timeout (an upper bound)
    timeout_seconds: float
    kv_free_gib_per_gpu: float
    max_full_length_requests: int    # how many max_model_len requests the KV cache holds
    runners_up: list[Candidate] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    disk_gib: int = DISK_FLOOR_GIB   # disk for the image and the model (see disk_gib_for)
    checkpoint_gib: float = 0.0      # the model's files
    # A machine image made for this job (``ephemera bake``) in the offer's region: id,
    # region, key, name, created. Passed to the launch, which boots from it.
    machine_image: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "offer": offer_dict(self.offer),
            "tensor_parallel_size": self.tensor_parallel_size,
            "estimate": self.estimate.to_dict(),
            "expected_cost_usd": round(self.expected_cost_usd, 4),
            "timeout_seconds": self.timeout_seconds,
            "kv_free_gib_per_gpu": round(self.kv_free_gib_per_gpu, 3),
            "max_full_length_requests": self.max_full_length_requests,
            "runners_up": [c.to_dict() for c in self.runners_up[:RUNNERS_UP_SHOWN]],
            "runners_up_total": len(self.runners_up),
            "rejected": [r.to_dict() for r in self.rejected],
            "notes": list(self.notes),
            "disk_gib": self.disk_gib,
            "checkpoint_gib": round(self.checkpoint_gib, 3),
            "machine_image": self.machine_image,
        }


def offer_dict(offer: Offer) -> dict[str, Any]:
    return {"provider": offer.provider, "instance_type": offer.instance_type,
            "region": offer.region, "gpu": offer.gpu, "gpu_count": offer.gpu_count,
            "gpu_memory_gib": offer.gpu_memory_gib, "vcpus": offer.vcpus,
            "memory_gib": offer.memory_gib, "price_per_hour": offer.price_per_hour,
            "spot": offer.spot, "price_source": offer.price_source,
            "compute_capability": offer_capability(offer)}


# ----------------------------------------------------------------------------- inputs






@dataclass
class _Settings:
    max_model_len: int
    utilization: float
    kv_dtype: str
    seqs: int | None
    tokens: int | None


def _settings(job: Job) -> _Settings:
    args = list(job.server.args)
    return _Settings(
        max_model_len=job.model.max_model_len,
        utilization=job.server.gpu_memory_utilization,
        kv_dtype=job.model.kv_cache_dtype,
        seqs=job.server.max_num_seqs or arg_value(args, "--max-num-seqs"),
        tokens=arg_value(args, "--max-num-batched-tokens"),
    )


def job_model(job: Job) -> ModelInfo:
    """The job's model as the estimator sees it (reads config.json; see modelconfig)."""
    return load_model(job.model.id, revision=job.model.revision)


def job_shape(job: Job, info: ModelInfo | None = None) -> Shape:
    """The job's model reduced for estimation."""
    info = info or job_model(job)
    return analyse(info, precision=job.model.precision, quantization=job.model.quantization)


# ----------------------------------------------------------------------------- disk


def checkpoint_gib(shape: Shape) -> float:
    """What the model's files take on disk: the weights as counted when vLLM runs the
    checkpoint's own format, else the parameters at the checkpoint's width (a 16-bit
    checkpoint quantised at load time; a 32-bit one when bf16/fp16 is not its own)."""
    if shape.scheme.from_checkpoint:
        return (shape.sharded_bytes + shape.replicated_bytes) / GIB
    width = 4 if shape.scheme.name in ("bf16", "fp16") else 2
    return shape.parameters * width / GIB


def disk_gib_for(job: Job, shape: Shape) -> int:
    """Disk the job needs on the machine besides its operating system: the vLLM image,
    the model's files and some slack, at least DISK_FLOOR_GIB. ``resources.disk_gib``
    wins when the job sets it."""
    if job.resources.disk_gib:
        return job.resources.disk_gib
    image = 0 if job.image == "host" else IMAGE_DISK_GIB
    return max(DISK_FLOOR_GIB, math.ceil(image + checkpoint_gib(shape) + DISK_SLACK_GIB))


# ----------------------------------------------------------------------------- fitting


def _gpu_matches(wanted: str, have: str | None) -> bool:
    if not have:
        return False
    w, h = wanted.lower(), have.lower()
    return h == w or h.startswith(w + "-")


def _constraint_reason(job: Job, offer: Offer, provider: str | None) -> str | None:
    res = job.resources
    if provider and offer.provider != provider:
        return f"The offer is from provider '{offer.provider}', but the job uses '{provider}'."
    if res.instance_type and offer.instance_type != res.instance_type:
        return f"The job asks for instance type {res.instance_type}, this is {offer.instance_type}."
    if res.gpu and not _gpu_matches(res.gpu, offer.gpu):
        return f"The job asks for GPU {res.gpu}, this offer has {offer.gpu or 'no GPU'}."
    if res.regions and offer.region is not None and offer.region not in res.regions:
        return (f"Region {offer.region} is not among the job's regions "
                f"({', '.join(res.regions)}).")
    if offer.spot and not res.spot:
        return "This is a spot price, but the job asks for on-demand (resources.spot is false)."
    if not offer.spot and res.spot and not res.spot_fallback:
        return "This is an on-demand price, but the job asks for spot without fallback."
    if res.max_price_per_hour is not None and offer.price_per_hour > res.max_price_per_hour:
        return (f"The price ${offer.price_per_hour:.4g}/h is above the cap of "
                f"${res.max_price_per_hour:.4g}/h (resources.max_price_per_hour).")
    return None


class _Fitter:
    """Checks offers against one shape; estimates are cached per TP size and vLLM defaults."""

    def __init__(self, job: Job, shape: Shape) -> None:
        self.job = job
        self.shape = shape
        self.s = _settings(job)
        self._cache: dict[tuple[int, int, int, bool], Estimate] = {}

    def estimate(self, tp: int, gpu_mem: float | None, gpu_name: str | None) -> Estimate:
        seqs, tokens = vllm_defaults(gpu_mem, gpu_name)
        key = (tp, seqs, tokens, gpu_mem is None)
        est = self._cache.get(key)
        if est is None:
            est = estimate_shape(
                self.shape, max_model_len=self.s.max_model_len, tensor_parallel_size=tp,
                gpu_memory_utilization=self.s.utilization, kv_cache_dtype=self.s.kv_dtype,
                max_num_seqs=self.s.seqs, max_num_batched_tokens=self.s.tokens,
                gpu_memory_gib=gpu_mem, gpu_name=gpu_name,
                limit_mm_per_prompt=self.job.model.limit_mm_per_prompt,
                mm_processor_kwargs=self.job.model.mm_processor_kwargs)
            self._cache[key] = est
        return est

    def fit(self, offer: Offer) -> Candidate | str:
        if offer.cpu_only:
            return self._fit_cpu(offer)
        forced = self.job.server.tensor_parallel_size
        if forced:
            if forced > offer.gpu_count:
                return (f"The job sets tensor_parallel_size {forced}, but the offer has "
                        f"{offer.gpu_count} GPU{'s' if offer.gpu_count != 1 else ''}.")
            sizes = [forced]
        else:
            sizes = valid_tensor_parallel_sizes(self.shape, offer.gpu_count)
        reason = "No tensor-parallel size fits."
        for tp in sizes:
            result = self._fit_gpu(offer, tp)
            if isinstance(result, Candidate):
                return result
            reason = result
        return reason

    def _fit_gpu(self, offer: Offer, tp: int) -> Candidate | str:
        est = self.estimate(tp, offer.gpu_memory_gib, offer.gpu)
        mem, util = offer.gpu_memory_gib, self.s.utilization
        budget = util * mem
        with_tp = f"With tensor parallelism {tp}, w" if tp > 1 else "W"
        room = budget - est.activation_gib_per_gpu - est.overhead_gib_per_gpu
        weights = est.weights_gib_per_gpu
        if weights > room:
            return (f"{with_tp}eights {weights:.2f} GiB per GPU exceed the {budget:.1f} GiB budget "
                    f"({util:g} x {mem:g} GiB) minus a {est.activation_gib_per_gpu:.1f} GiB "
                    f"activation peak and {est.overhead_gib_per_gpu:.2f} GiB overhead"
                    f"{est.multimodal_detail()}.")
        free = room - weights
        need = est.kv_cache_gib_per_request_per_gpu
        if free < need:
            prefix = f"With tensor parallelism {tp}, after" if tp > 1 else "After"
            return (f"{prefix} weights ({weights:.2f} GiB per GPU) and the activation peak "
                    f"({est.activation_gib_per_gpu:.2f} GiB) only {free:.2f} GiB per GPU is left for "
                    f"the KV cache, but one {self.s.max_model_len}-token request needs {need:.2f} GiB"
                    f"{est.multimodal_detail()}.")
        outside = mem - budget
        if outside < est.cuda_context_gib_per_gpu:
            return (f"gpu_memory_utilization {util:g} leaves only {outside:.2f} GiB of the "
                    f"{mem:g} GiB GPU for the CUDA context, which needs about "
                    f"{est.cuda_context_gib_per_gpu:.1f} GiB.")
        return Candidate(offer, tp, est, free, (free - need) * tp)

    def _fit_cpu(self, offer: Offer) -> Candidate | str:
        forced = self.job.server.tensor_parallel_size
        if forced and forced > 1:
            return f"The job sets tensor_parallel_size {forced}, but the offer has no GPU."
        est = self.estimate(1, None, None)
        budget = self.s.utilization * offer.memory_gib
        weights = est.weights_gib
        need = est.kv_cache_bytes_per_token * est.max_model_len / GIB
        free = budget - weights - CPU_OVERHEAD_GIB
        if free < need:
            return (f"CPU-only: weights {weights:.2f} GiB plus a {CPU_OVERHEAD_GIB:g} GiB runtime "
                    f"overhead and one {self.s.max_model_len}-token request ({need:.2f} GiB of KV "
                    f"cache) exceed {self.s.utilization:g} x {offer.memory_gib:g} GiB of host memory.")
        return Candidate(offer, 1, est, free, free - need)


# ----------------------------------------------------------------------------- planning


def make_plan(job: Job, offers: list[Offer], *, provider: str | None = None,
              shape: Shape | None = None, info: ModelInfo | None = None) -> Plan:
    """The cheapest fitting offer for ``job``. Raises NoFittingOfferError with the
    rejection table when nothing fits (nothing is launched). ``shape`` skips reading
    the model (its checkpoint's quantization is then read off the shape)."""
    if shape is None:
        info = info or job_model(job)
        shape = job_shape(job, info)
    needs = gpu_needs(job, shape, info.config if info is not None else None)
    fitter = _Fitter(job, shape)
    fitting: list[Candidate] = []
    rejected: list[Rejection] = []
    for offer in offers:
        reason = _constraint_reason(job, offer, provider)
        note = None
        if reason is None:
            reason, note = needs.check(offer)
        if reason is None:
            result = fitter.fit(offer)
            if isinstance(result, Candidate):
                fitting.append(replace(result, notes=(note,)) if note else result)
                continue
            reason = result
        rejected.append(Rejection(offer, reason))
    if not fitting:
        raise _no_fit(job, shape, offers, rejected)
    fitting.sort(key=lambda c: (c.offer.price_per_hour, -c.headroom_gib, c.offer.instance_type))
    best = fitting[0]
    need = best.estimate.kv_cache_gib_per_request_per_gpu if not best.offer.cpu_only else (
        best.estimate.kv_cache_bytes_per_token * best.estimate.max_model_len / GIB)
    return Plan(
        offer=best.offer, tensor_parallel_size=best.tensor_parallel_size, estimate=best.estimate,
        expected_cost_usd=best.offer.price_per_hour * job.timeout / 3600,
        timeout_seconds=job.timeout, kv_free_gib_per_gpu=best.kv_free_gib_per_gpu,
        max_full_length_requests=int(best.kv_free_gib_per_gpu // need) if need > 0 else 0,
        runners_up=fitting[1:], rejected=rejected, notes=list(best.notes),
        disk_gib=disk_gib_for(job, shape), checkpoint_gib=checkpoint_gib(shape))


def _no_fit(job: Job, shape: Shape, offers: list[Offer], rejected: list[Rejection]) -> NoFittingOfferError:
    if not offers:
        err = NoFittingOfferError(
            f"no offers to choose from for job '{job.name}'.",
            hint="Pass --catalog FILE or pick a provider that lists machines (--provider).")
    else:
        lines = [f"no offer can serve {shape.model} ({job.model.precision}, max_model_len "
                 f"{job.model.max_model_len}) for job '{job.name}'; nothing was launched. "
                 f"{len(rejected)} offer{'s' if len(rejected) != 1 else ''} rejected:"]
        lines += [f"  {r.offer.provider}/{r.offer.instance_type}"
                  f"{' ' + r.offer.region if r.offer.region else ''}"
                  f" (${r.offer.price_per_hour:.4g}/h): {r.reason}" for r in rejected[:TABLE_ROWS]]
        if len(rejected) > TABLE_ROWS:
            lines.append(f"  ... and {len(rejected) - TABLE_ROWS} more (see --json).")
        err = NoFittingOfferError("\n".join(lines))
    err.rejected = rejected  # type: ignore[attr-defined]
    return err


def offers_for_job(job: Job, *, catalog: Path | None = None,
                   provider_name: str | None = None) -> list[Offer]:
    """Offers to plan over: a catalog file's rows, or what the provider plugin lists."""
    if catalog is not None:
        offers = load_catalog(catalog)
        wanted = provider_name or job.resources.provider
        if wanted and not any(o.provider == wanted for o in offers):
            listed = ", ".join(sorted({o.provider for o in offers})) or "none"
            raise NoFittingOfferError(
                f"catalog {catalog} has no offers for provider '{wanted}' (it lists: {listed}).")
        return offers
    from ephemera.registry import get_provider

    name = provider_name or job.resources.provider or get_settings().default_provider
    res = job.resources
    # The price cap is applied by the planner, not the provider, so that offers over it
    # are listed with that reason instead of vanishing.
    request = OfferRequest(regions=tuple(res.regions), spot=res.spot, gpu=res.gpu,
                           instance_type=res.instance_type, options=res.model_dump(mode="json"))
    return list(get_provider(name).offers(request))


def plan_job(job: Job, *, catalog: Path | None = None, provider_name: str | None = None) -> Plan:
    """offers_for_job + make_plan: the one call ``plan`` and ``run`` share. Without a
    catalog file, a machine image baked for the job (``ephemera bake``) in the chosen
    offer's region is looked up and named in the plan."""
    offers = offers_for_job(job, catalog=catalog, provider_name=provider_name)
    provider = provider_name or job.resources.provider
    if catalog is None and provider is None:
        provider = get_settings().default_provider
    plan = make_plan(job, offers, provider=provider)
    if catalog is None:
        add_machine_image(job, plan)
    return plan


def add_machine_image(job: Job, plan: Plan) -> None:
    """Name a baked machine image for ``job`` in the plan, when the offer's provider
    keeps them (``machine_image_for``) and has one. A failed lookup is a note, never a
    failed plan: the run then boots the provider's usual image."""
    from ephemera.registry import get_provider

    finder = getattr(get_provider(plan.offer.provider), "machine_image_for", None)
    if finder is None:
        return
    try:
        image = finder(job, plan.offer)
    except Exception as exc:  # noqa: BLE001 - an optional speed-up
        plan.notes.append(f"baked images were not looked up ({type(exc).__name__}: {exc})")
        return
    if image:
        plan.machine_image = image
        plan.notes.append(f"boots the baked image {image['id']} ({image['region']}, made "
                          f"{image.get('created') or '?'}, key {image.get('key')}): the job's "
                          "image and model are already on its disk")
