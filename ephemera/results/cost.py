"""What a run cost, and where the money went.

Pure arithmetic over timestamps and a price: no clock, no I/O except writing and
reading the report files. The controller records when each phase started and ended
and when the machine was launched and verified terminated; :func:`compute_cost`
turns that into a :class:`CostReport`, and :func:`write_cost_files` puts
``cost.json`` (for machines: history import, CI outputs) and ``cost.md`` (for people)
in the run's artifacts directory.

Billing model: per second, rounded up to whole seconds, from launch to verified
termination, with the provider's minimum (AWS Linux: 60 s). Each phase costs its
share of billed time: the part of it that lies between launch and termination.
Phases before launch (plan) cost nothing. Time inside the billed window covered by
no phase ("between phases") and the billed time beyond the real runtime ("billing
minimum and rounding") are listed as their own rows, so the rows add up to the total.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ephemera.errors import ConfigError
from ephemera.spec.durations import format_duration

SCHEMA_VERSION = 1

# Phases in the order a run goes through them (the controller may add others).
PHASE_ORDER = ("plan", "provision", "boot", "server_start", "suite", "collect", "teardown")

# Smallest billed duration per provider, in seconds. AWS bills Linux instances per
# second with a one-minute minimum. A provider plugin may declare its own
# ``min_billed_seconds`` class attribute; see :func:`min_billed_seconds_for`.
MIN_BILLED_SECONDS: dict[str, int] = {"aws": 60}

# Names of the two rows that are not phases.
GAP_ROW = "between phases"
PADDING_ROW = "billing minimum and rounding"

# Environment variables GitHub Actions sets, read into the report so that a cost.json
# imported from CI artifacts still says which commit and workflow run it belongs to.
_CI_VARS = ("GITHUB_SHA", "GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "GITHUB_REPOSITORY",
            "GITHUB_SERVER_URL")


def min_billed_seconds_for(provider_name: str, provider: object | None = None) -> int:
    """The billing minimum for a provider: its own ``min_billed_seconds`` attribute when
    it declares one, else the built-in table, else 0 (no minimum)."""
    declared = getattr(provider, "min_billed_seconds", None) if provider is not None else None
    if isinstance(declared, int | float) and not isinstance(declared, bool) and declared >= 0:
        return int(declared)
    return MIN_BILLED_SECONDS.get(provider_name, 0)


@dataclass(frozen=True)
class CIContext:
    """Where a run came from on GitHub Actions (all empty outside CI)."""

    commit: str = ""
    run_id: str = ""        # GITHUB_RUN_ID-GITHUB_RUN_ATTEMPT, e.g. "9081726354-2"
    repository: str = ""
    server_url: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CIContext:
        env = os.environ if environ is None else environ
        run_id = env.get("GITHUB_RUN_ID", "")
        attempt = env.get("GITHUB_RUN_ATTEMPT", "")
        return cls(
            commit=env.get("GITHUB_SHA", ""),
            run_id=f"{run_id}-{attempt}" if run_id and attempt else run_id,
            repository=env.get("GITHUB_REPOSITORY", ""),
            server_url=env.get("GITHUB_SERVER_URL", "") if run_id else "",
        )


@dataclass(frozen=True)
class PhaseTiming:
    """When one phase of a run started and ended (timezone-aware datetimes)."""

    name: str
    started_at: datetime
    ended_at: datetime

    @property
    def seconds(self) -> float:
        return max(0.0, (self.ended_at - self.started_at).total_seconds())


@dataclass(frozen=True)
class PhaseCost:
    """One row of the split: wall time of the phase, the part of it that was billed,
    and what that part cost."""

    name: str
    seconds: float
    billed_seconds: float
    cost_usd: float
    started_at: str | None = None
    ended_at: str | None = None


@dataclass(frozen=True)
class CostReport:
    run_id: str
    job: str
    tier: str | None
    model: str
    provider: str
    instance_type: str
    region: str | None
    spot: bool
    price_per_hour: float
    price_source: str
    launched_at: str | None           # ISO 8601 UTC, None when nothing was launched
    terminated_at: str | None         # ISO 8601 UTC, None when termination is unverified
    termination_verified: bool
    runtime_seconds: float            # launch to termination, unrounded
    min_billed_seconds: int
    billed_seconds: int
    cost_usd: float
    phases: list[PhaseCost]
    unattributed_seconds: float       # billed window covered by no phase
    unattributed_cost_usd: float
    padding_seconds: float            # billed beyond runtime (minimum + rounding up)
    padding_cost_usd: float
    estimated_cost_usd: float | None
    estimated_seconds: float | None
    status: str = "unknown"
    exit_code: int | None = None
    started_at: str | None = None     # when the run began (first phase), ISO 8601 UTC
    duration_seconds: float = 0.0     # whole run, first phase start to last phase end
    ci: CIContext = field(default_factory=CIContext)
    schema_version: int = SCHEMA_VERSION

    # ---- derived -----------------------------------------------------------
    @property
    def cost_delta_usd(self) -> float | None:
        if self.estimated_cost_usd is None:
            return None
        return self.cost_usd - self.estimated_cost_usd

    def rows(self) -> list[PhaseCost]:
        """Every row of the split, including the two non-phase rows when non-zero."""
        extra = []
        if self.unattributed_seconds > 0:
            extra.append(PhaseCost(GAP_ROW, self.unattributed_seconds, self.unattributed_seconds,
                                   self.unattributed_cost_usd))
        if self.padding_seconds > 0:
            extra.append(PhaseCost(PADDING_ROW, 0.0, self.padding_seconds, self.padding_cost_usd))
        return [*self.phases, *extra]

    def with_outcome(self, status: str, exit_code: int | None) -> CostReport:
        """The same report with the run's final status (known only after teardown)."""
        return replace(self, status=status, exit_code=exit_code)

    # ---- serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_delta_usd"] = self.cost_delta_usd
        return data

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "cost report") -> CostReport:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, found {type(raw).__name__}")
        version = raw.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ConfigError(f"{source}: schema_version {version!r} is not supported "
                              f"(this ephemera reads version {SCHEMA_VERSION})")
        required = ("run_id", "job", "provider", "instance_type", "price_per_hour",
                    "billed_seconds", "cost_usd")
        for name in required:
            if name not in raw:
                raise ConfigError(f"{source}: field '{name}' is missing")
        values: dict[str, Any] = {}
        try:
            for name in cls.__dataclass_fields__:
                if name in raw:
                    values[name] = raw[name]
            values["phases"] = [PhaseCost(**p) for p in raw.get("phases") or []]
            values["ci"] = CIContext(**(raw.get("ci") or {}))
            defaults = {
                "tier": None, "model": "", "region": None, "spot": False, "price_source": "",
                "launched_at": None, "terminated_at": None, "termination_verified": False,
                "runtime_seconds": 0.0, "min_billed_seconds": 0, "unattributed_seconds": 0.0,
                "unattributed_cost_usd": 0.0, "padding_seconds": 0.0, "padding_cost_usd": 0.0,
                "estimated_cost_usd": None, "estimated_seconds": None,
            }
            for name, default in defaults.items():
                values.setdefault(name, default)
            report = cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{source}: malformed field: {exc}") from None
        for name in ("price_per_hour", "cost_usd", "billed_seconds"):
            value = getattr(report, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{source}: field '{name}' must be a non-negative number, "
                                  f"found {value!r}")
        if not isinstance(report.run_id, str) or not report.run_id:
            raise ConfigError(f"{source}: field 'run_id' must be a non-empty string")
        return report

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> CostReport:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(raw, source=str(path))


def billed_terms(offer: Any, instance: Any = None) -> dict[str, Any]:
    """What a run is billed at: the machine that was launched, as its provider recorded it
    in ``Instance.data`` (``market``: "spot"/"on-demand", ``region``, ``price_per_hour``,
    ``price_source``), else the planned offer. The two differ after a spot-to-on-demand
    fallback, a launch in another region, or a spot price read at launch. Returns the
    ``instance_type``, ``region``, ``spot``, ``price_per_hour`` and ``price_source``
    arguments of :func:`compute_cost`."""
    terms: dict[str, Any] = {
        "instance_type": offer.instance_type, "region": offer.region, "spot": offer.spot,
        "price_per_hour": offer.price_per_hour, "price_source": offer.price_source,
    }
    data = getattr(instance, "data", None) or {}
    if data.get("region"):
        terms["region"] = str(data["region"])
    market = data.get("market")
    if market in ("spot", "on-demand"):
        terms["spot"] = market == "spot"
    try:
        price = float(data.get("price_per_hour") or "")
    except ValueError:
        price = None
    if price is not None and math.isfinite(price) and price >= 0:
        terms["price_per_hour"] = price
        terms["price_source"] = str(data.get("price_source") or "recorded at launch")
    elif terms["spot"] != offer.spot or terms["region"] != offer.region:
        terms["price_source"] = (f"{offer.price_source} (the plan's price; the machine was "
                                 f"{market or 'launched'} in {terms['region']})")
    return terms


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("naive datetime: ephemera works in UTC only")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def compute_cost(
    *,
    run_id: str,
    job: str,
    tier: str | None,
    model: str,
    provider: str,
    instance_type: str,
    region: str | None,
    spot: bool,
    price_per_hour: float,
    price_source: str,
    launched_at: datetime | None,
    terminated_at: datetime | None,
    phases: Sequence[PhaseTiming],
    min_billed_seconds: int | None = None,
    estimated_cost_usd: float | None = None,
    estimated_seconds: float | None = None,
    status: str = "unknown",
    exit_code: int | None = None,
    ci: CIContext | None = None,
) -> CostReport:
    """The cost of one run.

    ``launched_at`` None means nothing was launched (cost 0). ``terminated_at`` None
    means termination could not be verified: billing then runs to the end of the last
    phase and the report says it is a lower bound. ``min_billed_seconds`` None takes
    the provider's minimum from :data:`MIN_BILLED_SECONDS`. ``ci`` None reads GitHub's
    environment variables.
    """
    if price_per_hour < 0:
        raise ConfigError(f"price_per_hour must not be negative, found {price_per_hour}")
    for moment in (launched_at, terminated_at, *(t for p in phases for t in (p.started_at, p.ended_at))):
        if moment is not None and moment.tzinfo is None:
            raise ValueError("naive datetime: ephemera works in UTC only")
    minimum = min_billed_seconds_for(provider) if min_billed_seconds is None else int(min_billed_seconds)
    rate = price_per_hour / 3600.0
    ordered = sorted(phases, key=lambda p: (p.started_at, p.ended_at))

    verified = terminated_at is not None
    end = terminated_at
    if end is None and launched_at is not None:
        last = max((p.ended_at for p in ordered), default=launched_at)
        end = max(last, launched_at)

    if launched_at is None or end is None:
        runtime, billed = 0.0, 0
    else:
        runtime = max(0.0, (end - launched_at).total_seconds())
        billed = max(math.ceil(runtime - 1e-9), minimum)

    # Each phase pays for its overlap with [launch, end], never twice for the same
    # second: a phase that overlaps the previous one is clipped to start where the
    # previous one ended.
    rows: list[PhaseCost] = []
    cursor = launched_at
    attributed = 0.0
    for phase in ordered:
        overlap = 0.0
        if launched_at is not None and end is not None and cursor is not None:
            lo = max(phase.started_at, cursor)
            hi = min(phase.ended_at, end)
            if hi > lo:
                overlap = (hi - lo).total_seconds()
                cursor = hi
        attributed += overlap
        rows.append(PhaseCost(
            name=phase.name,
            seconds=phase.seconds,
            billed_seconds=overlap,
            cost_usd=overlap * rate,
            started_at=_iso(phase.started_at),
            ended_at=_iso(phase.ended_at),
        ))
    gap = max(0.0, runtime - attributed)
    padding = max(0.0, billed - runtime)

    first = ordered[0].started_at if ordered else launched_at
    last_end = max((p.ended_at for p in ordered), default=end)
    duration = (last_end - first).total_seconds() if first and last_end else 0.0

    return CostReport(
        run_id=run_id,
        job=job,
        tier=tier,
        model=model,
        provider=provider,
        instance_type=instance_type,
        region=region,
        spot=spot,
        price_per_hour=price_per_hour,
        price_source=price_source,
        launched_at=_iso(launched_at),
        terminated_at=_iso(terminated_at),
        termination_verified=verified,
        runtime_seconds=runtime,
        min_billed_seconds=minimum,
        billed_seconds=billed,
        cost_usd=billed * rate,
        phases=rows,
        unattributed_seconds=gap,
        unattributed_cost_usd=gap * rate,
        padding_seconds=padding,
        padding_cost_usd=padding * rate,
        estimated_cost_usd=estimated_cost_usd,
        estimated_seconds=estimated_seconds,
        status=status,
        exit_code=exit_code,
        started_at=_iso(first),
        duration_seconds=max(0.0, duration),
        ci=CIContext.from_env() if ci is None else ci,
    )


# ---- files -------------------------------------------------------------------------

def usd(value: float | None) -> str:
    """Money for people: cents for sums from a dollar, sub-cent precision below."""
    if value is None:
        return "n/a"
    sign = "-" if value < 0 else ""
    value = abs(value)
    return f"{sign}${value:,.2f}" if value >= 1 else f"{sign}${value:.4f}"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "n/a"

    return format_duration(value) if value >= 1 else f"{value:.1f}s"


def cost_markdown(report: CostReport) -> str:
    """``cost.md``: the report as a short Markdown page (also reused in step summaries)."""
    market = "spot" if report.spot else "on-demand"
    where = f"{report.provider} {report.instance_type}" + (f" in {report.region}" if report.region else "")
    lines = [
        f"# Cost of run `{report.run_id}`",
        "",
        f"- Job: `{report.job}`" + (f" (tier `{report.tier}`)" if report.tier else ""),
        f"- Model: `{report.model}`" if report.model else "- Model: n/a",
        f"- Machine: {where}, {market}",
        f"- Price: {usd(report.price_per_hour)}/h ({report.price_source or 'source unknown'})",
        f"- Billed: {seconds_text(report.billed_seconds)} from launch to "
        + ("verified termination" if report.termination_verified else "end of the last phase")
        + (f" (minimum {report.min_billed_seconds}s)" if report.min_billed_seconds else ""),
        f"- **Cost: {usd(report.cost_usd)}**"
        + (f" (estimate {usd(report.estimated_cost_usd)}, "
           f"{'+' if (report.cost_delta_usd or 0) >= 0 else ''}{usd(report.cost_delta_usd)})"
           if report.estimated_cost_usd is not None else ""),
    ]
    if report.estimated_seconds is not None:
        lines.append(f"- Duration: {seconds_text(report.runtime_seconds)} billed window, "
                     f"estimate {seconds_text(report.estimated_seconds)}")
    if report.status != "unknown":
        lines.append(f"- Result: {report.status}"
                     + (f" (exit code {report.exit_code})" if report.exit_code is not None else ""))
    if not report.termination_verified and report.launched_at:
        lines += ["", "> **Warning:** termination of the machine was not verified; it may still "
                      "be billing. The cost above is a lower bound. Run `ephemera down --all`."]
    lines += ["", phases_table(report)]
    return "\n".join(lines) + "\n"


def phases_table(report: CostReport) -> str:
    """The split by phase as a Markdown table (share = part of the billed time)."""
    billed = report.billed_seconds or 0
    out = ["| Phase | Wall time | Billed | Share | Cost |", "|---|---:|---:|---:|---:|"]
    for row in report.rows():
        share = f"{100 * row.billed_seconds / billed:.1f}%" if billed else "0.0%"
        wall = seconds_text(row.seconds) if row.name != PADDING_ROW else ""
        out.append(f"| {row.name} | {wall} | {seconds_text(row.billed_seconds)} | {share} | "
                   f"{usd(row.cost_usd)} |")
    out.append(f"| **total** | {seconds_text(report.duration_seconds)} | "
               f"{seconds_text(report.billed_seconds)} | 100% | **{usd(report.cost_usd)}** |")
    return "\n".join(out)


def write_cost_files(report: CostReport, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``cost.json`` and ``cost.md`` into ``directory`` (created if needed).
    Each file is written to a temporary name and renamed, so a reader never sees half."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "cost.json"
    md_path = directory / "cost.md"
    _write_atomic(json_path, json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n")
    _write_atomic(md_path, cost_markdown(report))
    return json_path, md_path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
