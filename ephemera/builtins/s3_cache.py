"""Caches kept in an S3 prefix, moved by the machine itself with its own credentials (the
instance profile on aws). ephemera copies this file to the machine and runs it with a
Python that has boto3; it needs nothing else, and nothing of ephemera.

    python s3_cache.py restore-hub  s3://bucket/prefix HUB_DIR FOLDER
    python s3_cache.py save-hub     s3://bucket/prefix HUB_DIR FOLDER
    python s3_cache.py restore-compile s3://bucket/prefix ROOT KEY MANIFEST_TEXT
    python s3_cache.py save-compile    s3://bucket/prefix ROOT KEY

The hub cache (FOLDER is ``models--org--name`` under HUB_DIR) is kept as its ``blobs/``
and ``refs/`` plus ``snapshots.json``, a listing of the snapshot symlinks (commit ->
file -> blob), from which a restore makes the symlinks again: a plain sync would follow
them and store every file twice. A compile cache is the directory ROOT/KEY kept under
``prefix/KEY/``; it is restored only when the manifest stored there is exactly
MANIFEST_TEXT, and its manifest is written last both ways, so a cut-short copy is never
taken for a whole one. A save skips what is there already with the same size.

Each command prints one line ``@@s3cache {json}`` (action, state, files, bytes,
skipped, left, error) and exits 1 when it failed. ``--deadline SECONDS`` stops
starting new transfers after that long (``left`` counts what was not done).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MARK = "@@s3cache "
LISTING = "snapshots.json"
MANIFEST = "ephemera-cache.json"
WORKERS = 8
SMALL = 1 << 20            # files compared by content (ETag) rather than size alone


# ------------------------------------------------------------------ plumbing
def split_url(url: str) -> tuple[str, str]:
    """('bucket', 'prefix') of s3://bucket/prefix (no slash at either end of the prefix)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// location: {url}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url}")
    return bucket, prefix.strip("/")


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def safe_relative(name: str) -> bool:
    """A relative path that stays inside the directory it is joined to."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and "\0" not in name and all(
        p not in ("", ".", "..") for p in parts)


def client(region: str | None = None) -> Any:
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10,
                    read_timeout=60, max_pool_connections=WORKERS * 2)
    return boto3.client("s3", region_name=region, config=config)


def listed(s3: Any, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    """key relative to ``prefix`` -> (size, ETag without quotes), every page."""
    out: dict[str, tuple[int, str]] = {}
    start = prefix + "/" if prefix else ""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
        for item in page.get("Contents", []):
            out[item["Key"][len(start):]] = (int(item["Size"]), item.get("ETag", "").strip('"'))
    return out


def read_text(s3: Any, bucket: str, key: str) -> str | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def download(s3: Any, bucket: str, key: str, path: Path) -> None:
    """The object at ``path``, whole or not at all (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        s3.download_file(bucket, key, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Transfers:
    """Copies in parallel until a deadline; counts what was done and what was left."""

    def __init__(self, s3: Any, bucket: str, deadline: float) -> None:
        self.s3, self.bucket, self.deadline = s3, bucket, deadline
        self.files = self.bytes = self.left = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _one(self, job: tuple[str, str, Path, int]) -> None:
        direction, key, path, size = job
        if time.monotonic() > self.deadline:
            with self._lock:
                self.left += 1
            return
        try:
            if direction == "get":
                download(self.s3, self.bucket, key, path)
            else:
                self.s3.upload_file(str(path), self.bucket, key)
        except Exception as exc:  # noqa: BLE001 - counted; the others go on
            with self._lock:
                self.errors.append(f"{key}: {type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.files += 1
            self.bytes += size

    def run(self, jobs: list[tuple[str, str, Path, int]]) -> None:
        """``jobs``: ("get" or "put", key, local path, size) each."""
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            list(pool.map(self._one, jobs))

    @property
    def whole(self) -> bool:
        return not self.errors and not self.left

    def summary(self, action: str, state: str, skipped: int) -> dict[str, Any]:
        if self.errors or self.left:
            state = "partial"
        return {"action": action, "state": state, "files": self.files, "bytes": self.bytes,
                "skipped": skipped, "left": self.left, "error": "; ".join(self.errors[:3])}


def local_files(directory: Path) -> dict[str, Path]:
    """Regular files under ``directory`` by relative name (no symlinks, no temporary or
    lock files)."""
    if not directory.is_dir():
        return {}
    return {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.is_symlink()
            and not p.name.endswith((".incomplete", ".part", ".lock"))}


def _changed(path: Path, remote: tuple[int, str] | None, by_content: bool) -> bool:
    size = path.stat().st_size
    if remote is None or remote[0] != size:
        return True
    return by_content and size <= SMALL and remote[1] != md5_of(path)


# ------------------------------------------------------------------ the hub cache
def snapshot_listing(repo_dir: Path) -> dict[str, dict[str, str]]:
    """commit -> file in the snapshot -> the blob its symlink points at."""
    out: dict[str, dict[str, str]] = {}
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return out
    for commit in sorted(p for p in snapshots.iterdir() if p.is_dir()):
        files = {}
        for link in sorted(commit.rglob("*")):
            target = os.readlink(link) if link.is_symlink() else ""
            if target and posixpath.basename(posixpath.dirname(target)) == "blobs":
                files[str(link.relative_to(commit))] = posixpath.basename(target)
        if files:
            out[commit.name] = files
    return out


def make_links(repo_dir: Path, listing: dict[str, dict[str, str]]) -> int:
    """The snapshot symlinks of ``listing`` whose blob is present; how many were made."""
    made = 0
    for commit, files in listing.items():
        if not safe_relative(commit) or "/" in commit:
            continue
        for name, blob in files.items():
            if not safe_relative(name) or not safe_relative(blob) or "/" in blob:
                continue
            if not (repo_dir / "blobs" / blob).is_file():
                continue
            link = repo_dir / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(repo_dir / "blobs" / blob, link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(target)
            made += 1
    return made


def _read_listing(text: str | None) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {c: {n: b for n, b in f.items() if isinstance(n, str) and isinstance(b, str)}
            for c, f in data.items() if isinstance(c, str) and isinstance(f, dict)}


def _gets(remote: dict[str, tuple[int, str]], base: str, directory: Path,
          wanted: Callable[[str], bool]) -> tuple[list[tuple[str, str, Path, int]], int]:
    """The downloads that bring ``directory`` up to the objects under ``base`` that are
    ``wanted`` (safe names only), skipping files already there with the same size; and
    how many were skipped."""
    jobs, skipped = [], 0
    for name, (size, _etag) in sorted(remote.items()):
        if not wanted(name) or not safe_relative(name):
            continue
        path = directory / name
        if path.is_file() and path.stat().st_size == size:
            skipped += 1
            continue
        jobs.append(("get", join(base, name), path, size))
    return jobs, skipped


def restore_hub(s3: Any, url: str, hub_dir: Path, folder: str, deadline: float) -> dict[str, Any]:
    bucket, prefix = split_url(url)
    base = join(prefix, "hub", folder)
    remote = listed(s3, bucket, base)
    if not remote:
        return Transfers(s3, bucket, deadline).summary("restore-hub", "absent", 0)
    repo_dir = hub_dir / folder
    jobs, skipped = _gets(remote, base, repo_dir, lambda name: name.startswith(("blobs/", "refs/")))
    transfers = Transfers(s3, bucket, deadline)
    transfers.run(jobs)
    listing = _read_listing(read_text(s3, bucket, join(base, LISTING)))
    summary = transfers.summary("restore-hub", "restored", skipped)
    summary["links"] = make_links(repo_dir, listing)
    return summary


def save_hub(s3: Any, url: str, hub_dir: Path, folder: str, deadline: float) -> dict[str, Any]:
    bucket, prefix = split_url(url)
    base = join(prefix, "hub", folder)
    repo_dir = hub_dir / folder
    files = {f"blobs/{n}": p for n, p in local_files(repo_dir / "blobs").items() if "/" not in n}
    files.update({f"refs/{n}": p for n, p in local_files(repo_dir / "refs").items()})
    if not files:
        return Transfers(s3, bucket, deadline).summary("save-hub", "nothing", 0)
    remote = listed(s3, bucket, base)
    jobs, skipped = [], 0
    for name, path in files.items():
        if not _changed(path, remote.get(name), by_content=name.startswith("refs/")):
            skipped += 1
            continue
        jobs.append(("put", join(base, name), path, path.stat().st_size))
    transfers = Transfers(s3, bucket, deadline)
    transfers.run(jobs)
    stored = _read_listing(read_text(s3, bucket, join(base, LISTING))) if LISTING in remote else {}
    merged = {**stored, **snapshot_listing(repo_dir)}
    if merged != stored and transfers.whole:
        body = json.dumps(merged, sort_keys=True, indent=1).encode()
        s3.put_object(Bucket=bucket, Key=join(base, LISTING), Body=body)
        transfers.files += 1
    return transfers.summary("save-hub", "saved", skipped)


# ------------------------------------------------------------------ compile caches
def restore_compile(s3: Any, url: str, root: Path, key: str, manifest: str,
                    deadline: float) -> dict[str, Any]:
    """``prefix/KEY/`` into ROOT/KEY when its manifest is exactly ``manifest``."""
    bucket, prefix = split_url(url)
    base = join(prefix, key)
    stored = read_text(s3, bucket, join(base, MANIFEST))
    if stored is None:
        return Transfers(s3, bucket, deadline).summary("restore-compile", "absent", 0)
    if stored != manifest:
        return Transfers(s3, bucket, deadline).summary("restore-compile", "discarded", 0)
    directory = root / key
    local = directory / MANIFEST
    if local.is_file() and local.read_text(errors="replace") != manifest:
        shutil.rmtree(directory)     # another key's leftovers: never mixed with this one
    jobs, skipped = _gets(listed(s3, bucket, base), base, directory, lambda name: name != MANIFEST)
    transfers = Transfers(s3, bucket, deadline)
    transfers.run(jobs)
    if transfers.whole:
        directory.mkdir(parents=True, exist_ok=True)
        local.write_text(manifest)
    return transfers.summary("restore-compile", "restored", skipped)


def save_compile(s3: Any, url: str, root: Path, key: str, deadline: float) -> dict[str, Any]:
    """ROOT/KEY into ``prefix/KEY/`` when its manifest is of that key."""
    bucket, prefix = split_url(url)
    base = join(prefix, key)
    directory = root / key
    local = directory / MANIFEST
    try:
        manifest = local.read_text()
        if json.loads(manifest).get("key") != key:
            return Transfers(s3, bucket, deadline).summary("save-compile", "foreign", 0)
    except (OSError, ValueError, AttributeError):
        return Transfers(s3, bucket, deadline).summary("save-compile", "nothing", 0)
    remote = listed(s3, bucket, base)
    # A manifest of its own there that differs: nothing stored can be trusted by size.
    fresh = MANIFEST in remote and read_text(s3, bucket, join(base, MANIFEST)) != manifest
    jobs, skipped = [], 0
    for name, path in local_files(directory).items():
        if name == MANIFEST:
            continue
        if not fresh and not _changed(path, remote.get(name), by_content=False):
            skipped += 1
            continue
        jobs.append(("put", join(base, name), path, path.stat().st_size))
    transfers = Transfers(s3, bucket, deadline)
    transfers.run(jobs)
    if transfers.whole and (fresh or MANIFEST not in remote):
        s3.put_object(Bucket=bucket, Key=join(base, MANIFEST), Body=manifest.encode())
        transfers.files += 1
    return transfers.summary("save-compile", "saved", skipped)


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="s3_cache")
    parser.add_argument("action", choices=["restore-hub", "save-hub", "restore-compile",
                                           "save-compile"])
    parser.add_argument("url")
    parser.add_argument("directory")
    parser.add_argument("name", help="the hub folder, or the compile cache's key")
    parser.add_argument("manifest", nargs="?", default="")
    parser.add_argument("--deadline", type=float, default=900.0)
    parser.add_argument("--region", default=None)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline
    directory = Path(args.directory)
    try:
        s3 = client(args.region)
        if args.action == "restore-hub":
            summary = restore_hub(s3, args.url, directory, args.name, deadline)
        elif args.action == "save-hub":
            summary = save_hub(s3, args.url, directory, args.name, deadline)
        elif args.action == "restore-compile":
            summary = restore_compile(s3, args.url, directory, args.name, args.manifest, deadline)
        else:
            summary = save_compile(s3, args.url, directory, args.name, deadline)
    except Exception as exc:  # noqa: BLE001 - reported on the mark line; ephemera warns
        summary = {"action": args.action, "state": "failed", "error": f"{type(exc).__name__}: {exc}"}
    print(MARK + json.dumps(summary, sort_keys=True), flush=True)
    return 1 if summary["state"] in ("failed", "partial") else 0


if __name__ == "__main__":
    sys.exit(main())
