"""One masker for a whole run: every secret value, in every form a suite or a server
may print it, is replaced by ``***`` in what ephemera prints and writes.

A value is a secret when the job file substituted it from the environment
(``${VAR}``), or when its environment key looks like one (``*TOKEN*``, ``*KEY*``,
``*SECRET*``, ``*PASSWORD*``, ``*_PAT``, ``*CREDENTIAL*``), or it is the password of a
URL with credentials (``https://user:pass@host``). Each is masked as written, base64
encoded (at each of the three byte alignments, so inside a longer encoded text too)
and URL-encoded. A value shorter than :data:`MIN_SECRET` characters cannot be masked
without mangling ordinary output: it is refused as a secret, with a warning.
"""

from __future__ import annotations

import base64
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ephemera.spec.jobfile import LoadedJob

MASK = "***"
MIN_SECRET = 6
SECRET_KEY = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|_PAT$|^PAT_", re.I)
_URL_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:([^/@\s]+)@")
# Text artifacts larger than this are left as they are (and said so): masking reads
# the whole file.
MAX_MASKED_FILE = 64 * 1024 * 1024


def secret_values(env: Mapping[str, str]) -> list[str]:
    """The values of ``env`` that are secrets by their key, or URL passwords."""
    found = []
    for key, value in env.items():
        value = str(value)
        if SECRET_KEY.search(key):
            found.append(value)
        url = _URL_PASSWORD.match(value)
        if url:
            found.append(urllib.parse.unquote(url.group(1)))
    return found


def _forms(value: str) -> set[str]:
    """The value, its URL-encoded forms and the parts of its base64 encoding that do
    not depend on what comes before or after it."""
    forms = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    raw = value.encode()
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + raw).decode()
            # Drop the characters that also carry bits of the neighbours.
            start = (shift * 4 + 2) // 3
            stop = ((shift + len(raw)) * 4) // 3
            core = text[start:stop]
            if len(core) >= MIN_SECRET:
                forms.add(core)
    return forms


class Masker:
    """Replaces every form of every secret with ``***``."""

    def __init__(self, values: Iterable[str] = (), warn: Callable[[str], None] | None = None) -> None:
        self.values: list[str] = []
        forms: set[str] = set()
        for value in dict.fromkeys(v for v in values if v):
            if len(value) < MIN_SECRET:
                if warn:
                    warn(f"a secret value of {len(value)} characters is too short to mask without "
                         f"mangling ordinary output (at least {MIN_SECRET}): it is NOT masked; "
                         "use a longer secret")
                continue
            self.values.append(value)
            forms |= _forms(value)
        ordered = sorted(forms, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(MASK, text)

    def mask_file(self, path: Path) -> bool:
        """Mask a text file in place; binary and huge files are left as they are.
        Returns whether the file is now free of secrets as far as this can tell."""
        if self._pattern is None:
            return True
        try:
            if path.is_symlink() or not path.is_file():
                return True
            if path.stat().st_size > MAX_MASKED_FILE:
                return False
            data = path.read_bytes()
        except OSError:
            return False
        if b"\0" in data[:8192]:
            return not any(v.encode() in data for v in self.values)
        text = data.decode("utf-8", errors="surrogateescape")
        masked = self(text)
        if masked != text:
            tmp = path.with_name(path.name + ".masking")
            tmp.write_bytes(masked.encode("utf-8", errors="surrogateescape"))
            os.replace(tmp, path)
        return True

    def mask_tree(self, root: Path) -> list[Path]:
        """Mask every text file below ``root``; returns the files that could not be."""
        left = []
        if self._pattern is None or not root.exists():
            return left
        for path in sorted(root.rglob("*")):
            if not self.mask_file(path):
                left.append(path)
        return left


def job_masker(loaded: LoadedJob, warn: Callable[[str], None] | None = None) -> Masker:
    """The masker for a job: what its file substituted from the environment and the
    values of its secret-looking environment keys."""
    job = loaded.job
    return Masker([*loaded.substituted, *secret_values({**job.env, **job.suite.env, **job.server.env})],
                  warn=warn)


def mask_data(value: Any, masker: Masker) -> Any:
    """``value`` (JSON-like) with every string masked, for printing a job."""
    if isinstance(value, dict):
        return {k: mask_data(v, masker) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_data(v, masker) for v in value]
    return masker(value) if isinstance(value, str) else value
