"""Read a job file: YAML with line numbers, ``${VAR}`` expansion, tiers, and errors
reported the way a compiler reports them (file:line:col, field path, expected vs
found, every problem at once).

The schema itself is in ``ephemera.spec.job``.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from ephemera.spec.job import MAX_TIERS, Job
from ephemera.spec.yaml_reader import (
    MAX_TEXT_CHARS,
    JobFileError,
    Path_,
    Problem,
    clip,
    first_content_line,
    nearest,
    parse_yaml,
    plain_data,
    read_text,
)

_VAR = re.compile(r"\$\$|\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class LoadedJob:
    job: Job
    path: Path
    tier: str | None
    data: dict[str, Any]                       # the merged, expanded document
    locations: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    # Values that ${VAR} took from the environment: secrets until shown otherwise, so
    # they are masked wherever the run prints or writes them.
    substituted: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def location(self, path: Path_) -> tuple[int, int] | None:
        return nearest(self.locations, path)


# ------------------------------------------------------------------------- ${VAR} expansion

def expand_env(value: Any, env: Mapping[str, str], path: Path_, problems: list[tuple[Path_, str]],
               substituted: set[str] | None = None) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``.
    An unset variable without a default is an error naming it. Values taken from
    ``env`` are added to ``substituted``."""
    if isinstance(value, dict):
        return {k: expand_env(v, env, (*path, k), problems, substituted) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, (*path, i), problems, substituted) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        body = match.group(1)
        name, sep, default = body.partition(":-")
        if not _VAR_NAME.match(name):
            problems.append((path, f"'${{{body}}}' is not a valid variable reference (write ${{NAME}} or ${{NAME:-default}})"))
            return match.group(0)
        if name in env and (env[name] != "" or not sep):
            if substituted is not None and env[name]:
                substituted.add(env[name])
            return env[name]
        if sep:
            return default
        problems.append((path, f"environment variable {name} is not set (write ${{{name}:-default}} to allow that)"))
        return match.group(0)

    return _VAR.sub(replace, value)


def _strings(value: Any, path: Path_) -> Iterable[tuple[Path_, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*path, index))
    elif isinstance(value, str):
        yield path, value


def _check_expanded_size(raw: dict[str, Any], env: Mapping[str, str],
                         locations: Mapping[Path_, tuple[int, int]], name: str) -> None:
    """``${VAR}`` may not grow the text past MAX_TEXT_CHARS either (a reference repeated
    many times to a long variable): measured before anything is expanded."""
    total = 0
    for path, text in _strings(raw, ()):
        total += len(text)
        if "$" in text:
            for match in _VAR.finditer(text):
                var, sep, default = (match.group(1) or "").partition(":-")
                value = env.get(var, "") if var else "$"
                total += len(value if value or not sep else default) - len(match.group(0))
        if total > MAX_TEXT_CHARS:
            line, col = nearest(locations, path) or (None, None)
            raise JobFileError(name, [Problem(line, col, ".".join(str(p) for p in path),
                                              f"with ${{...}} expanded the file holds more than "
                                              f"{MAX_TEXT_CHARS} characters of text")])


# ------------------------------------------------------------------------------- tiers

def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_tier_count(raw: dict[str, Any], locations: Mapping[Path_, tuple[int, int]],
                      name: str) -> None:
    """Each tier is checked as a whole job: refuse a number of them that no one writes."""
    tiers = raw.get("tiers")
    if isinstance(tiers, dict) and len(tiers) > MAX_TIERS:
        line, col = locations.get(("tiers",), (None, None))
        raise JobFileError(name, [Problem(line, col, "tiers",
                                          f"at most {MAX_TIERS} tiers, found {len(tiers)}")])


def _apply_tier(data: dict[str, Any], tier: str, locations: dict[Path_, tuple[int, int]],
                name: str) -> tuple[dict[str, Any], dict[Path_, tuple[int, int]]]:
    tiers = data.get("tiers")
    if not isinstance(tiers, dict) or tier not in tiers:
        available = ", ".join(sorted(tiers)) if isinstance(tiers, dict) and tiers else "none defined"
        loc = locations.get(("tiers",))
        raise JobFileError(name, [Problem(loc[0] if loc else None, loc[1] if loc else None, "tiers",
                                          f"unknown tier '{tier}' (available: {available})")])
    override = tiers[tier]
    if override is None:
        override = {}
    if not isinstance(override, dict):
        loc = locations.get(("tiers", tier))
        raise JobFileError(name, [Problem(loc[0] if loc else None, loc[1] if loc else None, f"tiers.{tier}",
                                          f"a tier must be a mapping of overrides, found {_type_name(override)}")])
    if "tiers" in override:
        loc = locations.get(("tiers", tier, "tiers"))
        raise JobFileError(name, [Problem(loc[0] if loc else None, loc[1] if loc else None, f"tiers.{tier}.tiers",
                                          "a tier cannot define tiers")])
    merged = deep_merge(data, override)
    merged_locations = dict(locations)
    prefix = ("tiers", tier)
    for path, loc in locations.items():
        if path[: len(prefix)] == prefix and len(path) > len(prefix):
            merged_locations[path[len(prefix):]] = loc
    return merged, merged_locations


# ---------------------------------------------------------------------------- validation

def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", type(None): "nothing (null)"}.get(type(value), type(value).__name__)


def _found(data: Any, path: Iterable[str | int]) -> Any:
    node = data
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return _MISSING
    return node


_MISSING = object()


def _allowed_keys(model: type, path: Path_) -> list[str] | None:
    """Field names allowed at ``path`` (for 'unknown key' messages)."""
    from pydantic import BaseModel

    current: Any = model
    for part in path:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(str(part))
        if info is None:
            return None
        current = _model_in(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _model_in(annotation: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pydantic_problems(exc: ValidationError, data: dict[str, Any],
                       locations: Mapping[Path_, tuple[int, int]], prefix: str = "") -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = ".".join(str(p) for p in loc)
        kind = err["type"]
        found = _found(data, loc)
        if kind == "extra_forbidden":
            allowed = _allowed_keys(Job, loc[:-1])
            message = f"unknown key '{loc[-1]}'"
            if allowed:
                message += f" (allowed here: {', '.join(allowed)})"
            where = locations.get((*loc, "<key>")) or nearest(locations, loc)
        elif kind == "missing":
            message = "required field is missing"
            where = nearest(locations, loc[:-1]) if loc[:-1] else None
            if where is None and not loc[:-1]:
                where = (1, 1)
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            message = msg
            if found is not _MISSING and kind not in ("value_error",):
                message += f"; found {_type_name(found)} {_short(found)}"
            elif found is not _MISSING and "found" not in msg:
                message += f"; found {_short(found)}"
            where = nearest(locations, loc)
            if isinstance(found, dict):
                # A validator that names one bad key: point at that key, not the mapping.
                named = [k for k in found if f"'{k}'" in msg and (*loc, k, "<key>") in locations]
                if named:
                    where = locations[(*loc, named[0], "<key>")]
        line, col = where if where else (None, None)
        problems.append(Problem(line, col, prefix + dotted, message))
    return problems


def _semantic_problems(job: Job, data: dict[str, Any], base_dir: Path,
                       locations: Mapping[Path_, tuple[int, int]], check_provider: bool,
                       prefix: str = "") -> list[Problem]:
    """Checks beyond the schema: provider known, suite files present."""
    problems = []

    def at(path: Path_, message: str) -> None:
        where = nearest(locations, path)
        problems.append(Problem(where[0] if where else None, where[1] if where else None,
                                prefix + ".".join(str(p) for p in path), message))

    if check_provider and job.resources.provider:
        from ephemera.registry import provider_names

        known = provider_names()
        if job.resources.provider not in known:
            at(("resources", "provider"),
               f"unknown provider '{job.resources.provider}' (registered: {', '.join(known) or 'none'})")
    for index, entry in enumerate(job.suite.files):
        candidate = (base_dir / entry) if not os.path.isabs(entry) else Path(entry)
        try:
            found = candidate.exists()
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            at(("suite", "files", index), f"'{clip(entry, 60)}' is not a usable path ({reason})")
            continue
        if not found:
            at(("suite", "files", index),
               f"'{clip(entry, 200)}' does not exist (looked for {clip(str(candidate), 300)})")
    return problems


def _validate(data: dict[str, Any], locations: dict[Path_, tuple[int, int]], base_dir: Path,
              check_provider: bool, prefix: str = "",
              shown: dict[str, Any] | None = None) -> tuple[Job | None, list[Problem]]:
    """``shown`` is the document before ${VAR} expansion: messages quote values from it,
    so a secret taken from the environment never reaches a CI log."""
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        return None, _pydantic_problems(exc, data if shown is None else shown, locations, prefix)
    return job, _semantic_problems(job, data, base_dir, locations, check_provider, prefix)


def _resolve_local_model(job: Job, base_dir: Path) -> Job:
    """A relative model directory is relative to the job file (like suite.files), so the
    job works from any working directory. The API then serves it under the directory's
    name unless ``served_name`` says otherwise."""
    model_id = job.model.id
    if os.path.isabs(model_id) or model_id.startswith("ephemera/"):
        return job
    try:
        candidate = (base_dir / model_id).resolve()
        if not (candidate / "config.json").is_file():
            return job
    except (OSError, ValueError):  # not a path at all (too long, a NUL byte): a hub id
        return job
    served = job.model.served_name or candidate.name
    model = job.model.model_copy(update={"id": str(candidate), "served_name": served})
    return job.model_copy(update={"model": model})


def load_job(path: str | Path, tier: str | None = None, *, env: Mapping[str, str] | None = None,
             check_provider: bool = True, check_all_tiers: bool = True) -> LoadedJob:
    """Read, expand, merge and validate a job file. Raises JobFileError listing every
    problem (also those in tiers not selected, unless ``check_all_tiers`` is False)."""
    path = Path(path)
    name = str(path)
    text = read_text(path)
    tree = parse_yaml(text, name)
    if tree is None:
        raise JobFileError(name, [Problem(None, None, "", "the file is empty: a job needs at least name, model, image and suite")])
    locations: dict[Path_, tuple[int, int]] = {}
    raw = plain_data(tree, (), locations)
    if not isinstance(raw, dict):
        line = first_content_line(text)
        raise JobFileError(name, [Problem(line, 1, "", f"the top level must be a mapping of fields, found {_type_name(raw)}")])
    _check_tier_count(raw, locations, name)
    _check_expanded_size(raw, os.environ if env is None else env, locations, name)

    env_problems: list[tuple[Path_, str]] = []
    substituted: set[str] = set()
    data = expand_env(raw, os.environ if env is None else env, (), env_problems, substituted)
    problems = [Problem(*(nearest(locations, p) or (None, None)), ".".join(str(x) for x in p), m)
                for p, m in env_problems]

    base_dir = path.resolve().parent
    tiers = data.get("tiers") if isinstance(data.get("tiers"), dict) else {}
    if tier is not None:
        merged, merged_locations = _apply_tier(data, tier, locations, name)
    else:
        merged, merged_locations = data, locations
    shown = _apply_tier(raw, tier, locations, name)[0] if tier is not None else raw
    job, found = _validate(merged, merged_locations, base_dir, check_provider,
                           prefix="" if tier is None else "", shown=shown)
    problems.extend(found)

    if check_all_tiers and isinstance(tiers, dict):
        for other in tiers:
            if other == tier:
                continue
            try:
                other_data, other_locations = _apply_tier(data, other, locations, name)
            except JobFileError as exc:
                # The schema check of the base may already have reported this spot.
                known = {(p.line, p.column, p.path) for p in problems}
                problems.extend(p for p in exc.problems if (p.line, p.column, p.path) not in known)
                continue
            _, tier_problems = _validate(other_data, other_locations, base_dir, check_provider,
                                         prefix=f"[tier {other}] ",
                                         shown=_apply_tier(raw, other, locations, name)[0])
            # Problems the base already has are reported once.
            seen = {(p.line, p.column, p.message) for p in problems}
            problems.extend(p for p in tier_problems if (p.line, p.column, p.message) not in seen)

    if problems or job is None:
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise JobFileError(name, problems)
    job = _resolve_local_model(job, base_dir)
    return LoadedJob(job=job, path=path, tier=tier, data=merged, locations=merged_locations,
                     substituted=tuple(sorted(substituted)))
