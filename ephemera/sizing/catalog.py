"""Price catalogs: the built-in dated AWS catalog, users' CSV files, and cached refreshes.

A catalog is a CSV with the header
``provider,instance_type,region,gpu,gpu_count,gpu_memory_gib,vcpus,memory_gib,price_per_hour``
(an optional ``spot`` column marks spot prices, an optional ``compute_capability``
column gives the GPU's CUDA compute capability; lines starting with ``#`` are
comments). ``gpu_memory_gib`` is the usable memory of ONE GPU as the driver reports
it (:func:`usable_gib` turns a nominal figure into it); an empty ``gpu`` with
``gpu_count`` 0 is a CPU-only machine. A GPU row without a compute capability takes
the one of its GPU model when :data:`GPU_CAPABILITY` knows it. Planning reads
catalogs only, so it needs no cloud SDK and no credentials.

``ephemera catalog refresh aws`` stores live prices with :func:`save_cached_offers`;
:func:`builtin_aws_offers` prefers that cache over the built-in file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from ephemera.errors import ConfigError
from ephemera.provider import Offer, OfferRequest
from ephemera.spec.settings import get_settings

COLUMNS = ("provider", "instance_type", "region", "gpu", "gpu_count", "gpu_memory_gib",
           "vcpus", "memory_gib", "price_per_hour")
OPTIONAL_COLUMNS = ("spot", "compute_capability")
BUILTIN_AWS_FILE = "aws-gpu-catalog.csv"
BUILTIN_AWS_DATE = "2026-11"
BUILTIN_AWS_SOURCE = f"built-in catalog {BUILTIN_AWS_DATE}"

# Usable memory of a GPU whose usable figure was not read off a real vLLM log: the
# nominal MiB (what nvidia-smi reports as memory.total) / 1024 x this ratio, the
# lowest usable/nominal ratio measured (A10G), rounded down, so plans stay on the safe
# side. A T4 (15360 MiB) comes to 14.80 GiB.
USABLE_RATIO = 0.987

# CUDA compute capability per GPU model (NVIDIA's list of CUDA GPUs), for offers whose
# source does not give one. Keys are matched against the words of a GPU's name, so
# "Tesla T4", "NVIDIA A100-SXM4-80GB" and "V100-32GB" all resolve.
GPU_CAPABILITY: dict[str, float] = {
    "K80": 3.7, "M60": 5.2, "P100": 6.0, "V100": 7.0, "T4": 7.5, "A100": 8.0, "A10G": 8.6,
    "A10": 8.6, "A40": 8.6, "A6000": 8.6, "L4": 8.9, "L40": 8.9, "L40S": 8.9, "H100": 9.0,
    "H200": 9.0, "B200": 10.0,
}
MAX_COMPUTE_CAPABILITY = 20.0   # above any GPU's (Blackwell is 10.0 and 12.0): "86" is a typo
_NAME_WORDS = re.compile(r"[\s_\-/]+")


def usable_gib(nominal_mib: float) -> float:
    """Usable GiB of one GPU from its nominal MiB (see USABLE_RATIO)."""
    hundredths = round(nominal_mib / 1024 * USABLE_RATIO * 100, 6)  # 7896.0, not 7895.999
    return math.floor(hundredths) / 100


def gpu_capability(name: str | None) -> float | None:
    """The compute capability of a GPU model named ``name``, or None when unknown."""
    for word in _NAME_WORDS.split((name or "").upper()):
        if word in GPU_CAPABILITY:
            return GPU_CAPABILITY[word]
    return None


def offer_capability(offer: Offer) -> float | None:
    """The offer's own compute capability, else the one of its GPU model."""
    if offer.cpu_only:
        return None
    return offer.compute_capability or gpu_capability(offer.gpu)


def _number(raw: str, column: str, where: str, *, whole: bool = False, minimum: float = 0) -> Any:
    text = raw.strip()
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{where}: {column} '{raw}' is not {kind}.") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{where}: {column} must be at least {minimum:g}, found '{raw}'.")
    return value


def _bool(raw: str, where: str) -> bool:
    text = raw.strip().lower()
    if text in ("", "0", "false", "no", "on-demand", "ondemand"):
        return False
    if text in ("1", "true", "yes", "spot"):
        return True
    raise ConfigError(f"{where}: spot '{raw}' is not true or false.")


def _capability(raw: str, gpu: str | None, where: str) -> float | None:
    if not raw:
        return gpu_capability(gpu)
    if not gpu:
        raise ConfigError(f"{where}: compute_capability '{raw}' is set on a CPU-only row.")
    value = _number(raw, "compute_capability", where, minimum=1)
    if value >= MAX_COMPUTE_CAPABILITY:
        raise ConfigError(f"{where}: compute_capability '{raw}' is not a CUDA compute "
                          "capability such as 7.5 or 8.9.")
    return value


def parse_catalog(text: str, name: str, *, price_source: str | None = None) -> list[Offer]:
    """Parse catalog CSV text; errors name the file, the line and the column."""
    lines = text.splitlines()
    rows = [(number, line) for number, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise ConfigError(f"{name}: the catalog is empty (expected the header {','.join(COLUMNS)}).")
    header_no, header_line = rows[0]
    header = [h.strip() for h in next(csv.reader([header_line]))]
    missing = [c for c in COLUMNS if c not in header]
    unknown = [c for c in header if c not in COLUMNS and c not in OPTIONAL_COLUMNS]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(unknown)}")
        raise ConfigError(f"{name} line {header_no}: {'; '.join(parts)}.",
                          hint=f"The header is: {','.join(COLUMNS)} (optionally ,spot "
                               "and ,compute_capability).")
    source = price_source or f"catalog file {name}"
    offers: list[Offer] = []
    for number, line in rows[1:]:
        where = f"{name} line {number}"
        values = next(csv.reader(io.StringIO(line)))
        if len(values) != len(header):
            raise ConfigError(f"{where}: expected {len(header)} fields, found {len(values)}.")
        row = dict(zip(header, (v.strip() for v in values), strict=True))
        for column in ("provider", "instance_type"):
            if not row[column]:
                raise ConfigError(f"{where}: {column} is empty.")
        gpu_count = _number(row["gpu_count"], "gpu_count", where, whole=True)
        gpu = row["gpu"] or None
        if gpu_count and not gpu:
            raise ConfigError(f"{where}: gpu is empty but gpu_count is {gpu_count}.")
        if gpu and not gpu_count:
            raise ConfigError(f"{where}: gpu is '{gpu}' but gpu_count is 0.")
        gpu_mem = _number(row["gpu_memory_gib"] or "0", "gpu_memory_gib", where)
        if gpu_count and gpu_mem <= 0:
            raise ConfigError(f"{where}: gpu_memory_gib must be above 0 for a GPU machine.")
        offers.append(Offer(
            provider=row["provider"], instance_type=row["instance_type"],
            region=row["region"] or None, gpu=gpu, gpu_count=gpu_count,
            gpu_memory_gib=gpu_mem,
            vcpus=_number(row["vcpus"], "vcpus", where, whole=True),
            memory_gib=_number(row["memory_gib"], "memory_gib", where),
            price_per_hour=_number(row["price_per_hour"], "price_per_hour", where),
            spot=_bool(row.get("spot", ""), where), price_source=source,
            compute_capability=_capability(row.get("compute_capability", ""), gpu, where)))
    return offers


def load_catalog(path: Path) -> list[Offer]:
    """Offers from a user's CSV file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"catalog file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read catalog file {path}: {exc}.") from None
    return parse_catalog(text, str(path))


def builtin_aws_catalog() -> list[Offer]:
    """The dated AWS catalog shipped with ephemera."""
    text = resources.files("ephemera").joinpath("data", BUILTIN_AWS_FILE).read_text(encoding="utf-8")
    return parse_catalog(text, BUILTIN_AWS_FILE, price_source=BUILTIN_AWS_SOURCE)


def filter_offers(offers: list[Offer], request: OfferRequest) -> list[Offer]:
    """Apply an OfferRequest's filters (GPU model, instance type, price cap, spot)."""
    out = []
    for offer in offers:
        if request.gpu and (offer.gpu or "").lower() != request.gpu.lower():
            continue
        if request.instance_type and offer.instance_type != request.instance_type:
            continue
        if request.max_price_per_hour is not None and offer.price_per_hour > request.max_price_per_hour:
            continue
        if offer.spot and not request.spot:
            continue
        out.append(offer)
    return out


def builtin_aws_offers(request: OfferRequest) -> list[Offer]:
    """AWS offers for planning: the refreshed cache when there is one, else the built-in
    catalog. The built-in file prices each type in one region; when the request names
    regions, each type is offered there at that price (marked in ``price_source``)."""
    offers = load_cached_offers("aws") or builtin_aws_catalog()
    if request.regions:
        wanted = set(request.regions)
        exact = [o for o in offers if o.region in wanted]
        have = {(o.instance_type, o.region, o.spot) for o in exact}
        moved = []
        for offer in offers:
            if offer.region in wanted:
                continue
            for region in request.regions:
                if (offer.instance_type, region, offer.spot) not in have:
                    have.add((offer.instance_type, region, offer.spot))
                    moved.append(Offer(**{**asdict(offer), "region": region,
                                          "price_source": f"{offer.price_source} ({offer.region} price)"}))
        offers = exact + moved
    return filter_offers(offers, request)


# ----------------------------------------------------------------------------- cache


def _cache_path(provider: str) -> Path:
    return get_settings().cache_dir / "catalog" / f"{provider}.json"


def save_cached_offers(provider: str, offers: list[Offer], source: str) -> Path:
    """Store refreshed offers (written atomically) for later plans."""
    path = _cache_path(provider)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"provider": provider, "source": source,
           "saved_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "offers": [asdict(o) for o in offers]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def load_cached_offers(provider: str) -> list[Offer] | None:
    """Offers saved by :func:`save_cached_offers`, or None when there are none. A damaged
    cache is ignored (the built-in catalog still works) rather than failing a plan."""
    path = _cache_path(provider)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        source = f"{doc.get('source', 'cache')} {doc.get('saved_at', '')}".strip()
        offers = []
        for raw in doc["offers"]:
            raw = dict(raw)
            raw.setdefault("price_source", source)
            raw["price_source"] = raw["price_source"] or source
            offers.append(Offer(**raw))
        return offers or None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
