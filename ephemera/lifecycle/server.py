"""The vLLM server: its command line (both launcher forms from one description) and
its health check.

``vllm serve MODEL ...`` is the real GPU command; the CPU build of vLLM has no
working console script, so it is started as
``python -m vllm.entrypoints.openai.api_server --model MODEL ...``. Every other
option is the same in both forms.
"""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from ephemera.spec.job import BUILTIN_CPU_IMAGE, Job

DEFAULT_PORT = 8000
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class ServerCommand:
    launcher: str                 # "vllm" or "api_server"
    argv: tuple[str, ...]         # the full command line
    served_name: str
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def shell(self) -> str:
        return shlex.join(self.argv)


def resolve_launcher(job: Job) -> str:
    if job.server.launcher != "auto":
        return job.server.launcher
    return "api_server" if job.image.split(":")[0] == BUILTIN_CPU_IMAGE else "vllm"


def vllm_options(job: Job, *, tensor_parallel_size: int, host: str, port: int,
                 served_name: str) -> list[str]:
    """The options shared by both launcher forms, from the job and the plan."""
    model = job.model
    server = job.server
    opts = ["--served-model-name", served_name, "--host", host, "--port", str(port),
            "--max-model-len", str(model.max_model_len),
            "--tensor-parallel-size", str(tensor_parallel_size),
            "--gpu-memory-utilization", f"{server.gpu_memory_utilization:g}"]
    if model.precision in _DTYPES:
        opts += ["--dtype", _DTYPES[model.precision]]
    quantization = model.quantization or ("fp8" if model.precision == "fp8" else None)
    if quantization:
        opts += ["--quantization", quantization]
    if model.kv_cache_dtype != "auto":
        opts += ["--kv-cache-dtype", model.kv_cache_dtype]
    if server.max_num_seqs:
        opts += ["--max-num-seqs", str(server.max_num_seqs)]
    if model.revision:
        opts += ["--revision", model.revision]
    if model.limit_mm_per_prompt is not None:
        opts += ["--limit-mm-per-prompt", json.dumps(model.limit_mm_per_prompt, separators=(",", ":"))]
    if model.mm_processor_kwargs is not None:
        opts += ["--mm-processor-kwargs", json.dumps(model.mm_processor_kwargs, separators=(",", ":"))]
    return opts + list(server.args)


def build_server_command(job: Job, *, model_path: str, tensor_parallel_size: int,
                         python: str | None = None, host: str = "127.0.0.1",
                         launcher: str | None = None, port: int | None = None) -> ServerCommand:
    """The vLLM command for this job. ``model_path`` is what vLLM loads (a hub id or a
    directory on the instance); the API serves it as the job's served name."""
    launcher = launcher or resolve_launcher(job)
    served = job.model.name_served
    port = port or job.server.port or DEFAULT_PORT
    opts = vllm_options(job, tensor_parallel_size=tensor_parallel_size, host=host,
                        port=port, served_name=served)
    if launcher == "vllm":
        argv = ["vllm", "serve", model_path, *opts]
    else:
        argv = [python or job.server.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", model_path, *opts]
    return ServerCommand(launcher=launcher, argv=tuple(argv), served_name=served,
                         port=port, env=dict(job.server.env))


@dataclass(frozen=True)
class Health:
    healthy: bool       # /health answered 200
    model_listed: bool  # /v1/models lists the served name
    detail: str = ""

    @property
    def ready(self) -> bool:
        return self.healthy and self.model_listed


def check_health(base_url: str, served_name: str, timeout: float = 2.0) -> Health:
    """One look at the server: ``/health`` is 200 and ``/v1/models`` lists the model."""
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=timeout) as resp:
            if resp.status != 200:
                return Health(False, False, f"/health answered {resp.status}")
    except urllib.error.HTTPError as exc:
        return Health(False, False, f"/health answered {exc.code}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        return Health(False, False, f"/health: {reason}")
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
        return Health(True, False, f"/v1/models: {exc}")
    names = [entry.get("id") for entry in body.get("data", []) if isinstance(entry, dict)]
    if served_name in names:
        return Health(True, True, "ready")
    return Health(True, False, f"/v1/models lists {names}, not {served_name!r}")
