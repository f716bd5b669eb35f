"""Fingerprints of the weight files models are built from, and of what a method would load.

A model is the bytes it was built from: a file under an official name (``sam_vit_b_01ec64.pth``)
may hold anything, and its predictions must not carry the published model's ``model_version``.
The fingerprint of

- a weight file is its sha256;
- a hub snapshot folder (BLIP) is the sha256 over ``<file name>:<sha256>`` lines of its
  ``*.safetensors`` files, sorted by name;
- a tiny random twin (no file) is :data:`TINY`;
- a table weight that is not on this machine is what would be downloaded, the published file:
  its table sha256, ``hub:<hub id>`` for a hub snapshot (the table holds no digest for it), or
  ``unpublished:<file>`` for a file published without a digest.

Hashing a 2.4 GB file takes seconds, so sha256s are cached in the process and on disk, in
``$OVSS_CACHE_DIR/fingerprints.sqlite``, keyed by (resolved path, size, mtime_ns): a file is
hashed once per machine, and again only when it changes. SQLite with a timeout keeps
concurrent processes safe; a cache that cannot be written only costs re-hashing.

A table file whose sha256 is not the table's is logged once per file and process
(:func:`weight_fingerprint`). Nothing here imports torch or builds a model, so a server can
answer with a model's identity (``identity.py``) before loading anything; a file hashed for the
first time is logged (a server hashes its files at start: ``Engine.warm``).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from ..store import cache_dir
from .weights import WeightSpec, find_weight, sha256_file

log = logging.getLogger(__name__)

TINY = "tiny"
"""The fingerprint of a tiny random twin: no file was loaded."""

_StatKey = tuple[str, int, int]  # (resolved path, size, mtime_ns)

_lock = threading.Lock()
_known: dict[_StatKey, str] = {}  # sha256 by stat key, this process
_warned: set[str] = set()  # resolved paths already reported as not the published file
_disk_failed: list[bool] = []  # the disk cache failed once: said once, then skipped


def _stat_key(path: Path) -> _StatKey:
    resolved = path.resolve()  # hub snapshots are symlinks into a blob store
    stat = resolved.stat()
    return str(resolved), stat.st_size, stat.st_mtime_ns


@contextmanager
def _database() -> Iterator[sqlite3.Connection]:
    path = cache_dir() / "fingerprints.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path, timeout=30)) as db, db:  # `with db` commits
        db.execute(
            "CREATE TABLE IF NOT EXISTS sha256 (path TEXT PRIMARY KEY, size INTEGER, "
            "mtime_ns INTEGER, digest TEXT)"
        )
        yield db


def _disk_lookup(key: _StatKey) -> str | None:
    if _disk_failed:
        return None
    try:
        with _database() as db:
            row = db.execute(
                "SELECT digest FROM sha256 WHERE path = ? AND size = ? AND mtime_ns = ?", key
            ).fetchone()
    except (OSError, sqlite3.Error) as exc:  # e.g. a read-only home in a container
        _disk_unavailable(exc)
        return None
    return str(row[0]) if row else None


def _disk_store(key: _StatKey, digest: str) -> None:
    if _disk_failed:
        return
    try:
        with _database() as db:
            db.execute("INSERT OR REPLACE INTO sha256 VALUES (?, ?, ?, ?)", (*key, digest))
    except (OSError, sqlite3.Error) as exc:
        _disk_unavailable(exc)


def _disk_unavailable(exc: Exception) -> None:
    _disk_failed.append(True)
    log.warning("weight fingerprint cache disabled (%s): set OVSS_CACHE_DIR", exc)


def cached_sha256(path: Path) -> str | None:
    """The sha256 of ``path`` if this process or machine computed it for the file as it is
    now (same size and mtime); None otherwise. Never reads the file."""
    key = _stat_key(path)
    with _lock:
        known = _known.get(key)
    if known is None:
        known = _disk_lookup(key)
        if known is not None:
            with _lock:
                _known[key] = known
    return known


def file_sha256(path: Path) -> str:
    """The sha256 of ``path``, hashed once per machine and file version (module docstring)."""
    known = cached_sha256(path)
    if known is not None:
        return known
    before = _stat_key(path)
    log.info("fingerprinting %s (%s), once per machine", path.name, _human_size(before[1]))
    digest = sha256_file(Path(before[0]))
    if _stat_key(path) == before:  # not rewritten while read: the digest is of this version
        with _lock:
            _known[before] = digest
        _disk_store(before, digest)
    return digest


def remember_sha256(path: Path, digest: str) -> None:
    """Records the sha256 of a file just written whose bytes were hashed on the way (a
    download), so it is never read again to fingerprint it."""
    key = _stat_key(path)
    with _lock:
        _known[key] = digest
    _disk_store(key, digest)


def snapshot_fingerprint(folder: Path) -> str:
    """A hub snapshot folder's fingerprint: sha256 over its ``*.safetensors`` files' sha256s."""
    lines = [f"{f.name}:{file_sha256(f)}\n" for f in sorted(folder.glob("*.safetensors"))]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def weight_fingerprint(spec: WeightSpec | None, path: Path) -> str:
    """The fingerprint of the file or snapshot folder ``path`` that is loaded for ``spec``.

    Args:
        spec: The table row the file stands for; None for a file outside the table (a tiny
            checkpoint). A file whose sha256 is not ``spec.sha256`` is logged at WARNING,
            once per resolved path and process.
        path: A weight file, or a hub snapshot folder.
    """
    if path.is_dir():
        return snapshot_fingerprint(path)
    digest = file_sha256(path)
    if spec is not None and spec.sha256 and digest != spec.sha256:
        _warn_not_published(spec, path, digest)
    return digest


def _warn_not_published(spec: WeightSpec, path: Path, digest: str) -> None:
    resolved = str(path.resolve())
    with _lock:
        if resolved in _warned:
            return
        _warned.add(resolved)
    log.warning(
        "weight %s: %s has sha256 %s..., not the published %s...; its predictions carry a "
        "different model version",
        spec.name,
        path,
        digest[:12],
        spec.sha256[:12],
    )


def published_fingerprint(spec: WeightSpec) -> str:
    """The fingerprint of the file ``spec`` names as published (what a download gives);
    ``unpublished:<file>`` for a file whose publisher gives no digest (DINOv2)."""
    if spec.sha256 or spec.format != "hf_hub":
        return spec.sha256 or f"unpublished:{spec.file}"
    return f"hub:{spec.hub_id}"


def expected_fingerprint(spec: WeightSpec) -> str:
    """The fingerprint of the file a build of ``spec`` would load now, without loading it:
    the file found on this machine (``weights.find_weight``), else the published one."""
    found = find_weight(spec)
    return weight_fingerprint(spec, found) if found is not None else published_fingerprint(spec)


def _human_size(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def forget_process_cache() -> None:
    """Forgets the sha256s and warnings of this process (the disk cache stays): tests, and a
    long-running process that wants warnings repeated."""
    with _lock:
        _known.clear()
        _warned.clear()
        _disk_failed.clear()
