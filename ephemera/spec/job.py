"""The job file's schema: strict pydantic models (unknown keys are refused).

Loading (YAML with line numbers, ``${VAR}`` expansion, tiers, compiler-style
errors) lives in ``ephemera.spec.jobfile``; this module only says what a job is.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from ephemera.errors import ConfigError
from ephemera.results.benchmark import LATENCY_METRICS, METRICS, RATE_METRICS
from ephemera.results.junit import check_grouping
from ephemera.spec.durations import (
    MAX_JOB_SECONDS,
    format_job_duration,
    parse_duration,
    parse_job_duration,
)
from ephemera.transport.hostkeys import accepted_entries

Precision = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"]

# The built-in CPU environment/image and the tiny model, for running the whole
# lifecycle on a machine without a GPU (see README: "Running without a GPU").
BUILTIN_CPU_IMAGE = "ephemera/cpu"
BUILTIN_TINY_MODEL = "ephemera/tiny-llama"
BUILTIN_TINY_VL_MODEL = "ephemera/tiny-vl"
# Built-in model ids and the tiny-model recipes that make them on this machine.
BUILTIN_MODELS = {BUILTIN_TINY_MODEL: "tiny-llama", BUILTIN_TINY_VL_MODEL: "tiny-vl"}


Duration = Annotated[
    float,
    BeforeValidator(parse_job_duration),
    PlainSerializer(format_job_duration, return_type=str),
    WithJsonSchema({
        "anyOf": [
            {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?h)?(\d+(\.\d+)?m)?(\d+(\.\d+)?s)?\s*$|^\d+$"},
            {"type": "number", "minimum": 0.001, "maximum": MAX_JOB_SECONDS},
        ],
        "description": "A duration: 90s, 20m, 1h30m, or seconds as a number; at most 168h.",
    }),
]

NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Bounds on counts, from what vLLM and the providers accept.
MAX_TENSOR_PARALLEL = 64       # GPUs one model is split over
MAX_NUM_SEQS = 65_536          # requests vLLM schedules at once
MAX_PRICE_PER_HOUR = 1_000.0   # USD; the largest cloud GPU machines cost about a tenth of it
MAX_DISK_GIB = 16_000          # an EBS gp3 volume holds at most 16 TiB, the image included
MAX_TIERS = 20
MAX_DECLARED_GPUS = 64
MAX_VARIANTS = 8
VARIANT_NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_env(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not ENV_NAME_RE.match(key):
            raise ValueError(f"'{key}' is not a valid environment variable name")
    return value


class ModelSpec(Strict):
    id: str = Field(min_length=1, description=(
        "Hugging Face repo id (org/name), a local directory holding config.json, "
        f"or '{BUILTIN_TINY_MODEL}' / '{BUILTIN_TINY_VL_MODEL}' (tiny random models, text and "
        "vision-language, made on this machine)."))
    precision: Precision = Field("bf16", description="Weights precision.")
    max_model_len: int = Field(4096, gt=0, le=10_000_000, description="Context length vLLM must serve.")
    revision: str | None = Field(None, description="Hugging Face revision (branch, tag or commit).")
    quantization: str | None = Field(None, description=(
        "vLLM --quantization method (awq, gptq, fp8, ...). Default: from the precision "
        "and the checkpoint's own quantization_config."))
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    served_name: str | None = Field(None, description="Name the API serves the model under (default: id).")
    limit_mm_per_prompt: dict[str, int] | None = Field(None, description=(
        "vLLM --limit-mm-per-prompt: most items of each modality per prompt, e.g. "
        "{image: 2, video: 0}. All zero serves a vision-language model as text only."))
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description=(
        "vLLM --mm-processor-kwargs, e.g. {max_pixels: 1003520}: bounds the largest image "
        "and so the multimodal profiling memory."))

    @field_validator("limit_mm_per_prompt")
    @classmethod
    def _limits(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for key, count in (value or {}).items():
            if key not in ("image", "video", "audio"):
                raise ValueError(f"'{key}' is not a modality (image, video, audio)")
            if not 0 <= count <= 1024:
                raise ValueError(f"{key}: {count} is not a count from 0 to 1024")
        return value

    @property
    def name_served(self) -> str:
        return self.served_name or self.id


class ServerSpec(Strict):
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    args: list[str] = Field(default_factory=list, description="Extra vLLM arguments.")
    env: dict[str, str] = Field(default_factory=dict)
    port: int | None = Field(None, ge=1, le=65535, description=(
        "Port vLLM listens on (on the instance's loopback). Default: a free port on machines "
        "shared with other runs (local, ssh, docker host network), else 8000."))
    max_num_seqs: int | None = Field(None, gt=0, le=MAX_NUM_SEQS)
    tensor_parallel_size: int | None = Field(None, gt=0, le=MAX_TENSOR_PARALLEL,
                                             description="Force a TP size (default: the plan's).")
    launcher: Literal["auto", "vllm", "api_server"] = Field("auto", description=(
        "'vllm' runs `vllm serve`; 'api_server' runs `python -m vllm.entrypoints.openai.api_server` "
        "(the CPU build); 'auto' picks api_server for the built-in CPU image."))
    python: str = Field("python3", description="Interpreter for the api_server launcher.")
    health_timeout: Duration = Field(default=parse_duration("20m"))

    _env_names = field_validator("env")(_check_env)


class SuiteSpec(Strict):
    command: str = Field(min_length=1, description="Shell command run on the instance.")
    files: list[str] = Field(default_factory=list, description="Local paths (relative to the job file) uploaded first.")
    timeout: Duration = Field(default=parse_duration("30m"))
    image: str | None = Field(None, description="Run the suite in this image instead of the job's.")
    setup: list[str] = Field(default_factory=list, description="Commands run before the suite (e.g. pip install pytest).")
    prepare: list[str] = Field(
        default_factory=list, max_length=100, description=(
            "Commands that need no server (installs, downloads): they run while vLLM starts, "
            "in the suite's environment, before setup and the suite."))
    prepare_timeout: Duration = Field(default=parse_duration("30m"), description=(
        "How long suite.prepare may take (it starts with the server)."))
    env: dict[str, str] = Field(default_factory=dict)

    _env_names = field_validator("env")(_check_env)

    @field_validator("prepare")
    @classmethod
    def _prepare_commands(cls, value: list[str]) -> list[str]:
        for index, command in enumerate(value):
            if not command.strip():
                raise ValueError(f"command {index + 1} is empty: give a shell command or drop it")
        return value


class SSHTarget(Strict):
    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str = "root"
    key: str | None = Field(None, description="Private key file.")
    workroot: str | None = Field(None, description=(
        "Directory on the host for runs (absolute or '~/...'); default: the ssh_workroot "
        "setting, ~/ephemera-runs."))
    gpus: list[dict[str, Any]] | None = Field(None, max_length=MAX_DECLARED_GPUS, description="Declared GPUs when the host has no nvidia-smi.")
    network: Literal["bridge", "host"] = Field("bridge", description=(
        "The job container's network on this shared host: bridge (its own, the server's "
        "port published on the host's 127.0.0.1 only, private IPC) or host."))
    host_key: str | None = Field(None, max_length=16384, description=(
        "Host key the machine must present: 'TYPE BASE64' lines or a SHA256:... fingerprint "
        "(else known_hosts decides)."))

    @field_validator("host_key")
    @classmethod
    def _host_key(cls, value: str | None) -> str | None:
        try:
            entries = accepted_entries(value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        if value is not None and not entries:
            raise ValueError("host_key is empty: give 'TYPE BASE64' or a SHA256:... fingerprint")
        return value


class DockerOptions(Strict):
    network: Literal["bridge", "host"] = "bridge"
    shm_size: str = "1g"
    exec: Literal["docker", "ssh"] = Field("docker", description="Run commands through the Docker API or SSH.")


class AWSOptions(Strict):
    ami: str | None = None
    subnet_ids: list[str] = Field(default_factory=list)
    security_group_id: str | None = None
    ssh_cidr: str | None = None
    key_name: str | None = None
    ssh_user: str = "ubuntu"


class ResourcesSpec(Strict):
    provider: str | None = Field(None, description="aws | docker | ssh | local | any registered plugin (default: setting).")
    max_price_per_hour: float | None = Field(None, gt=0, le=MAX_PRICE_PER_HOUR)
    spot: bool = False
    spot_fallback: bool = Field(True, description="Fall back to on-demand when spot has no capacity.")
    gpu: str | None = Field(None, description="Require this GPU model (e.g. L40S).")
    instance_type: str | None = None
    regions: list[str] = Field(default_factory=list)
    disk_gib: int | None = Field(None, gt=0, le=MAX_DISK_GIB)
    boot_timeout: Duration = Field(default=parse_duration("15m"))
    tags: dict[str, str] = Field(default_factory=dict, description="Extra labels/tags on every resource.")
    ssh: SSHTarget | None = None
    docker: DockerOptions = Field(default_factory=DockerOptions)
    aws: AWSOptions = Field(default_factory=AWSOptions)
    options: dict[str, Any] = Field(default_factory=dict, description="Options for third-party providers.")


_S3_LOCATION = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?")


def s3_location_problem(value: str) -> str | None:
    """Why ``value`` (starting with s3://) is not a usable s3://BUCKET/PREFIX, or None."""
    bucket = value[5:].split("/")[0]
    if not _S3_LOCATION.fullmatch(value) or ".." in bucket:
        return (f"'{value}' is not an S3 location: s3://BUCKET/PREFIX with a bucket name of "
                "3-63 lower-case letters, digits, '.' and '-'")
    return None


class CacheSpec(Strict):
    weights: str | None = Field(None, max_length=1024, description=(
        "Keep the Hugging Face cache (hub weights) across runs: 'auto' (the provider's own "
        "place) or a location (a directory; on docker a host directory; on aws "
        "s3://BUCKET/PREFIX). Default: the cache_weights setting; unset = off."))
    compile: str | None = Field(None, max_length=1024, description=(
        "Keep vLLM's and torch's compile caches across runs: 'auto' or a location (a Docker "
        "volume name on docker, a directory elsewhere, s3://BUCKET/PREFIX on aws), one cache "
        "per key (model revision, vLLM version, GPU type, compile arguments). Default: the "
        "cache_compile setting."))

    @field_validator("weights", "compile")
    @classmethod
    def _location(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\0" in value or "\n" in value):
            raise ValueError("give 'auto' or a location (a directory, or a Docker volume name)")
        if value is not None and value.startswith("s3://") and (problem := s3_location_problem(value)):
            raise ValueError(problem)
        return value


class ResultsSpec(Strict):
    junit: list[str] = Field(default_factory=list, max_length=50, description=(
        "Globs of JUnit XML files, relative to the run's artifacts directory ('**' for any "
        "depth). Default: every collected *.xml file that parses as JUnit."))
    group_by: str | None = Field(None, description=(
        "Group the results table by marker, file, class or property:NAME."))

    @field_validator("junit")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or pattern.startswith("/") or ".." in pattern.split("/"):
                raise ValueError(f"'{pattern}' must be a relative glob without '..'")
        return value

    @field_validator("group_by")
    @classmethod
    def _grouping(cls, value: str | None) -> str | None:
        return None if value is None else check_grouping(value)


class BenchmarkDataset(Strict):
    path: str = Field(min_length=1, description=(
        "Dataset file on the instance, relative to the suite directory (upload it with suite.files)."))
    format: Literal["custom", "sharegpt"] = Field("custom", description=(
        "custom: JSON lines with a 'prompt' field; sharegpt: ShareGPT conversations."))


class BenchmarkSpec(Strict):
    requests: int = Field(50, ge=1, le=1_000_000, description="Number of requests.")
    concurrency: int | None = Field(None, ge=1, le=MAX_NUM_SEQS, description="Requests in flight at most.")
    request_rate: float | None = Field(None, gt=0, le=1_000_000, description=(
        "Requests started per second (Poisson arrivals); default: all at once."))
    input_len: int = Field(128, ge=1, le=10_000_000, description="Prompt tokens (random dataset).")
    output_len: int = Field(64, ge=1, le=10_000_000, description="Tokens generated per request.")
    dataset: BenchmarkDataset | None = Field(None, description="Prompts from a file instead of random tokens.")
    warmup: int = Field(0, ge=0, le=100_000, description="Warm-up requests, not measured.")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    endpoint: Literal["chat", "completions"] = "chat"
    timeout: Duration = Field(default=parse_duration("10m"))
    args: list[str] = Field(default_factory=list, description="Extra `vllm bench serve` arguments.")


class Bound(Strict):
    max: float | None = Field(None, ge=0, allow_inf_nan=False, description="Absolute upper bound.")
    min: float | None = Field(None, ge=0, allow_inf_nan=False, description="Absolute lower bound.")
    max_vs_baseline: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False,
                                          description="At most this times the baseline.")
    min_vs_baseline: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False,
                                          description="At least this times the baseline.")

    @model_validator(mode="after")
    def _some(self) -> Bound:
        if all(v is None for v in (self.max, self.min, self.max_vs_baseline, self.min_vs_baseline)):
            raise ValueError("give at least one of max, min, max_vs_baseline, min_vs_baseline")
        return self


def _benchmark_gates_model() -> type[BaseModel]:
    fields: dict[str, Any] = {name: (Bound | None, None) for name in METRICS}
    return create_model("BenchmarkGates", __base__=Strict, **fields)


BenchmarkGates = _benchmark_gates_model()


class PassRateBy(Strict):
    group: str = Field(description="marker | file | class | property:NAME")
    min: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(description=(
        "Least pass rate per group; 'default' for the groups not named."))

    @field_validator("group")
    @classmethod
    def _grouping(cls, value: str) -> str:
        return check_grouping(value)


class BaselineSpec(Strict):
    runs: int = Field(5, ge=1, le=1000, description="Median of this many last passing runs.")
    ref: str | None = Field(None, description=(
        "Only runs recorded from this branch (default: the branch of the run)."))


class GatesSpec(Strict):
    pass_rate: float | None = Field(None, ge=0, le=1, description=(
        "Least overall pass rate: passed / (passed + failed + errors)."))
    pass_rate_by: PassRateBy | None = None
    benchmark: BenchmarkGates | None = Field(None, description="Bounds on benchmark figures.")  # type: ignore[valid-type]
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)

    @property
    def on_results(self) -> bool:
        return self.pass_rate is not None or self.pass_rate_by is not None


def _compare_gates_model() -> type[BaseModel]:
    ratio = Annotated[float | None, Field(None, gt=0, le=1000, allow_inf_nan=False)]
    fields: dict[str, Any] = {"pass_rate_drop_max": (
        Annotated[float | None, Field(None, ge=0, le=1, allow_inf_nan=False)], None)}
    for metric in LATENCY_METRICS + RATE_METRICS:
        name = metric.removesuffix("_ms")
        fields[f"{name}_ratio_max"] = (ratio, None)
        fields[f"{name}_ratio_min"] = (ratio, None)
    return create_model("CompareGates", __base__=Strict, **fields)


# B against A: pass_rate_drop_max (A's pass rate minus B's, at most), and for every
# benchmark figure FIGURE_ratio_max / FIGURE_ratio_min (B's figure / A's), e.g.
# e2e_p90_ratio_max or output_tokens_per_s_ratio_min.
CompareGates = _compare_gates_model()


class CompareSpec(Strict):
    placement: Literal["auto", "same-machine", "parallel"] = Field("auto", description=(
        "same-machine: one instance, the variants one after another (one boot); parallel: "
        "one instance per variant at once; auto: the cheaper, unless the deadline needs parallel."))
    baseline: str | None = Field(None, description="The variant the others are compared with (default: the first).")
    deadline: Duration | None = Field(None, description=(
        "The whole comparison must end within this; auto then picks parallel when one after "
        "another could take longer."))
    gates: CompareGates = Field(default_factory=CompareGates)  # type: ignore[valid-type]
    bootstrap: int = Field(2000, ge=100, le=100_000, description="Resamples for the P90 ratio's interval.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the bootstrap.")


class Job(Strict):
    name: str = Field(description="Lower-case letters, digits and dashes (at most 63).")
    model: ModelSpec
    image: str = Field(min_length=1, description=(
        f"Container image with vLLM, 'host' (vLLM installed on the host), or '{BUILTIN_CPU_IMAGE}'."))
    server: ServerSpec = Field(default_factory=ServerSpec)
    suite: SuiteSpec
    artifacts: list[str] = Field(default_factory=list, description="Paths on the instance pulled back after the suite.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    env: dict[str, str] = Field(default_factory=dict, description="Environment for the server and the suite.")
    timeout: Duration = Field(default=parse_duration("60m"), description="Deadline for the whole run, teardown included.")
    results: ResultsSpec = Field(default_factory=ResultsSpec)
    benchmark: BenchmarkSpec | None = Field(None, description="A load test against the server after the suite.")
    gates: GatesSpec = Field(default_factory=GatesSpec)
    tiers: dict[str, dict[str, Any]] = Field(default_factory=dict, max_length=MAX_TIERS,
                                             description="Named overrides, deep-merged over the base.")
    variants: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict, max_length=MAX_VARIANTS,
        description="A/B: named overrides, each deep-merged over the job (like tiers) and run.")
    compare: CompareSpec | None = Field(None, description="How the variants are placed and judged.")
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Caches kept across runs.")

    _env_names = field_validator("env")(_check_env)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.match(NAME_RE, value):
            raise ValueError("must be 1 to 63 lower-case letters, digits and dashes, "
                             "starting and ending with a letter or digit")
        return value

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key in value:
            if not re.match(NAME_RE, key):
                raise ValueError(f"tier name '{key}' must be lower-case letters, digits and dashes")
        return value

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, value: dict[str, dict[str, Any] | None]) -> dict[str, dict[str, Any] | None]:
        if len(value) == 1:
            raise ValueError("give at least two variants to compare (e.g. a: {} and b: {...})")
        for key, override in value.items():
            if not re.match(VARIANT_NAME_RE, key):
                raise ValueError(f"variant name '{key}' must be 1 to 20 lower-case letters, "
                                 "digits and dashes")
            for reserved in ("name", "variants", "compare", "tiers"):
                if override and reserved in override:
                    raise ValueError(f"variant '{key}' cannot set '{reserved}'")
        return value

    @model_validator(mode="after")
    def _compare_needs_variants(self) -> Job:
        if self.compare is not None and not self.variants:
            raise ValueError("compare: needs a `variants:` section with two or more variants")
        base = self.compare.baseline if self.compare is not None else None
        if base is not None and base not in self.variants:
            raise ValueError(f"compare.baseline: '{base}' is not a variant "
                             f"({', '.join(self.variants)})")
        return self

    @field_validator("gates")
    @classmethod
    def _gates_need_a_benchmark(cls, value: GatesSpec, info: ValidationInfo) -> GatesSpec:
        if value.benchmark is not None and info.data.get("benchmark") is None:
            raise ValueError("gates.benchmark needs a `benchmark:` section to measure")
        return value

    def provider_name(self, default: str) -> str:
        return self.resources.provider or default


def job_json_schema() -> dict[str, Any]:
    schema = Job.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ephemera job file"
    return schema
