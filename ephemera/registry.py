"""Provider plugins, found through the entry-point group ``ephemera.providers``.

The built-in providers (local, docker, ssh, aws) are registered the same way in
pyproject.toml. A plugin whose import fails (say boto3 is missing) is reported with
its error instead of breaking the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from ephemera.errors import ProviderUnavailableError

GROUP = "ephemera.providers"

# What to install when a built-in provider's SDK is missing.
_INSTALL_HINTS = {
    "aws": "pip install 'ephemera-gpu[aws]'",
    "docker": "pip install 'ephemera-gpu[docker]'",
}


@dataclass(frozen=True)
class ProviderEntry:
    name: str
    target: str          # "module:Class" from the entry point
    distribution: str    # which installed package registered it


@lru_cache(maxsize=1)
def _entries() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def provider_names() -> list[str]:
    return sorted(_entries())


def list_providers() -> list[ProviderEntry]:
    out = []
    for name, ep in sorted(_entries().items()):
        dist = ep.dist.name if ep.dist is not None else "?"
        out.append(ProviderEntry(name=name, target=ep.value, distribution=dist))
    return out


def load_provider_class(name: str) -> type:
    """The provider class registered as ``name``. Raises ProviderUnavailableError."""
    entries = _entries()
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise ProviderUnavailableError(
            f"unknown provider '{name}' (registered: {known}).",
            hint="A plugin registers itself under the entry-point group 'ephemera.providers'.",
        )
    try:
        cls = entries[name].load()
    except ImportError as exc:
        hint = _INSTALL_HINTS.get(name, f"install the package that provides '{name}'")
        raise ProviderUnavailableError(
            f"provider '{name}' cannot be loaded: {exc}.", hint=f"Fix: {hint}."
        ) from exc
    missing = [m for m in _REQUIRED if not callable(getattr(cls, m, None))]
    if missing:
        raise ProviderUnavailableError(
            f"provider '{name}' ({entries[name].value}) does not implement {', '.join(missing)} "
            "of the provider contract.",
            hint="See ephemera/provider.py: Provider and Capabilities.")
    return cls


# What the controller calls on every provider (ephemera.provider.Provider).
_REQUIRED = ("capabilities", "offers", "launch", "poll", "terminate", "find", "connect")


def get_provider(name: str, **kwargs):
    """An instance of provider ``name`` (constructed with the process settings)."""
    cls = load_provider_class(name)
    return cls(**kwargs)


def check_provider(name: str) -> tuple[bool, str]:
    """(usable, detail) for ``ephemera providers``: loads the plugin and, when it has
    one, asks its ``check()`` method whether it can work here."""
    try:
        cls = load_provider_class(name)
    except ProviderUnavailableError as exc:
        return False, str(exc)
    check = getattr(cls, "check", None)
    if check is None:
        return True, "loaded"
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - a plugin's check must not crash the listing
        return False, f"check failed: {exc}"
