"""Trained versions of each project's head, and which one is active: promotion and rollback.

The ``versions`` table lives in the server's database (``store.events_path(data_dir)``, beside
the ``jobs`` table), one short ``BEGIN IMMEDIATE`` transaction per call, a new connection per
call (as ``jobs.py``). A version is a run folder under :func:`heads_dir`
(``<data>/heads/<project>/``) holding ``head.safetensors``; its row records the folder
(relative to the data directory), the head file's sha256, the ``model_version`` predictions
carry, the gate's metrics, the job and the training snapshot. A project with no active
version uses its zero-shot method.

**Promotion protocol** (no half-written version is ever active):

1. train into a folder of the job's own (anywhere);
2. :meth:`VersionStore.install` copies it into ``heads_dir`` under a dot-named staging folder,
   fsyncs every file and folder, then renames it into place (one atomic rename) and fsyncs
   ``heads_dir``: a crash leaves either no folder or a complete one;
3. :meth:`VersionStore.register` hashes ``head.safetensors`` and refuses the folder unless it
   is complete (outside ``heads_dir``, missing head, sha256 differing from the caller's): only a
   complete artifact gets a row;
4. :meth:`VersionStore.activate` flips the active flag in one transaction (the old version's
   cleared, the new one's set; a partial UNIQUE index allows one active version per project).

Rollback is :meth:`activate` of an older version (``ovss-label models activate``);
:meth:`deactivate` goes back to zero-shot. **Pruning** keeps the active version, pinned ones
and the newest ``keep``; it deletes the other rows in one transaction, then their folders: a
crash in between leaves an orphan folder (:meth:`orphans`, removed by the next prune), never a
row naming a missing folder. Folders younger than ``ORPHAN_GRACE_SECONDS`` are never orphans:
one just renamed into place may be a moment from its ``register``.

Names are ``v1``, ``v2``, ... per project, from a counter that survives pruning (a name never
comes back for another head).
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..models.weights import sha256_file
from . import database as sqlite_file

"""How long a call waits for another process's write transaction before it fails."""

HEAD_FILE = "head.safetensors"
"""The file a version's folder must hold (``training/head.py`` writes it)."""

ORPHAN_GRACE_SECONDS = 3600.0
"""Age (since the folder's last change) before a folder with no row counts as an orphan."""

VERSIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, project INTEGER NOT NULL, name TEXT NOT NULL,
    artifact TEXT NOT NULL UNIQUE, head_sha256 TEXT NOT NULL, model_version TEXT NOT NULL,
    metrics TEXT NOT NULL, job_id INTEGER, snapshot TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, activated_at REAL,
    pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1)),
    active INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1)),
    UNIQUE (project, name)
);
CREATE UNIQUE INDEX IF NOT EXISTS versions_one_active ON versions (project) WHERE active = 1;
CREATE TABLE IF NOT EXISTS version_numbers (
    project INTEGER PRIMARY KEY, last INTEGER NOT NULL
);
"""
"""The ``versions`` table (``metrics`` is JSON text) and each project's last version number."""


_CLEAR_ACTIVE = "UPDATE versions SET active = 0 WHERE project = ? AND active = 1"


class VersionError(ValueError):
    """A version that cannot be registered, activated or found (one-line message)."""


class UnknownVersionError(VersionError):
    """No version of that name in the project (the message lists the known ones)."""


def heads_dir(data_dir: Path, project: int) -> Path:
    """The folder holding a project's version folders: ``<data_dir>/heads/<project>``."""
    return data_dir / "heads" / str(project)


@dataclass(frozen=True)
class Version:
    """One row of the ``versions`` table, as plain values.

    Attributes:
        id: Row id (grows with registration: a larger id is a newer version).
        project: The Label Studio project id.
        name: ``v1``, ``v2``, ... (unique per project, never reused).
        artifact: The run folder, relative to the data directory (``heads/7/<folder>``).
        head_sha256: The sha256 of its ``head.safetensors``, checked at registration.
        model_version: The string predictions of this version carry.
        metrics: The gate's numbers (JSON object; ``miou`` when the caller recorded it).
        job_id: The training job that produced it, if any.
        snapshot: The training data's manifest hash ("" when unknown).
        created_at: When it was registered (clock seconds).
        activated_at: When it was last activated (None if never).
        pinned: Pruning keeps it.
        active: Predictions use it (at most one per project).
    """

    id: int
    project: int
    name: str
    artifact: str
    head_sha256: str
    model_version: str
    metrics: dict[str, Any]
    job_id: int | None
    snapshot: str
    created_at: float
    activated_at: float | None
    pinned: bool
    active: bool

    def to_dict(self) -> dict[str, Any]:
        """The version as JSON-able values (``GET /versions``, ``ovss-label models versions``)."""
        return asdict(self)

    @property
    def miou(self) -> float | None:
        """The mIoU in ``metrics`` (key ``miou`` or ``mIoU``), if recorded."""
        value = self.metrics.get("miou", self.metrics.get("mIoU"))
        return float(value) if isinstance(value, int | float) else None


def _version(row: sqlite3.Row) -> Version:
    v = dict(row)
    v.update(metrics=json.loads(v["metrics"]), pinned=bool(v["pinned"]), active=bool(v["active"]))
    return Version(**v)


def _fsync(path: Path) -> None:
    """Flushes a file's or folder's content to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VersionStore:
    """The ``versions`` table of one SQLite file and the version folders of one data directory;
    safe across threads, processes and restarts."""

    def __init__(
        self, path: Path, data_dir: Path, *, clock: Callable[[], float] = time.time
    ) -> None:
        """Opens (creating if needed) the table in ``path``.

        Args:
            path: The SQLite file (the data directory's ``events.sqlite``).
            data_dir: The data directory; version folders live under its ``heads/``.
            clock: Seconds now, for timestamps and orphan ages (tests pass a fake).
        """
        self.path, self.data_dir, self._clock = path, data_dir, clock
        sqlite_file.create(path, VERSIONS_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite_file.connect(self.path)

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_file.write(self.path)

    def _select(self, sql: str, *params: Any) -> builtins.list[Version]:
        with closing(self._connect()) as db:
            return [_version(row) for row in db.execute(sql, params).fetchall()]

    @staticmethod
    def _load(db: sqlite3.Connection, project: int, name: str) -> Version:
        """The version ``name`` of ``project``; else :class:`UnknownVersionError` listing the
        project's versions."""
        sql = "SELECT * FROM versions WHERE project = ? AND name = ?"
        row = db.execute(sql, (project, name)).fetchone()
        if row is None:
            sql = "SELECT name FROM versions WHERE project = ? ORDER BY id DESC"
            known = ", ".join(r["name"] for r in db.execute(sql, (project,))) or "none"
            raise UnknownVersionError(f"project {project} has no version {name!r} (known: {known})")
        return _version(row)

    # ---- artifacts -----------------------------------------------------------------------
    def artifact_path(self, version: Version) -> Path:
        """The version's run folder on this machine."""
        return self.data_dir / version.artifact

    def head_path(self, version: Version) -> Path:
        """The version's ``head.safetensors`` (what ``fmbseg``'s ``head=`` takes)."""
        return self.artifact_path(version) / HEAD_FILE

    def install(self, project: int, run_dir: Path, folder: str | None = None) -> Path:
        """Copies a finished run folder into ``heads_dir`` atomically (module docstring, step
        2): a dot-named staging copy, fsynced, renamed to ``folder`` (default: the run folder's
        name). Returns the installed folder, ready for :meth:`register`."""
        name = folder or run_dir.name
        if not name or name.startswith(".") or "/" in name:
            raise VersionError(f"a version folder needs a plain name, not {name!r}")
        if not (run_dir / HEAD_FILE).is_file():
            raise VersionError(f"{run_dir} holds no {HEAD_FILE}: training did not finish")
        parent = heads_dir(self.data_dir, project)
        target = parent / name
        if target.exists():
            raise VersionError(f"{target} already exists: install under another folder name")
        parent.mkdir(parents=True, exist_ok=True)
        staging = parent / f".staging-{uuid.uuid4().hex}"
        try:
            shutil.copytree(run_dir, staging, symlinks=False)
            for sub, _, files in os.walk(staging):
                for file in files:
                    _fsync(Path(sub) / file)
                _fsync(Path(sub))
            os.rename(staging, target)  # atomic; refuses a non-empty existing target
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync(parent)
        return target

    def _relative(self, project: int, artifact_dir: Path) -> str:
        """``artifact_dir`` relative to the data directory, if it is a version folder of
        ``project`` (a direct, plainly named child of its ``heads_dir``); else VersionError."""
        folder, parent = artifact_dir.resolve(), heads_dir(self.data_dir, project).resolve()
        if folder.parent != parent or folder.name.startswith("."):
            raise VersionError(
                f"{artifact_dir} is not a version folder of project {project}: install it into"
                f" {heads_dir(self.data_dir, project)} first (VersionStore.install)"
            )
        return folder.relative_to(self.data_dir.resolve()).as_posix()

    def _check_head(self, folder: Path, head_sha256: str) -> None:
        """Refuses a folder whose head file is missing or is not the one expected."""
        head = folder / HEAD_FILE
        if not head.is_file():
            raise VersionError(f"{folder} holds no {HEAD_FILE}: an incomplete artifact")
        found = sha256_file(head)  # not the stat-keyed cache: verify the bytes
        if found != head_sha256.lower():
            raise VersionError(
                f"{head} has sha256 {found[:12]}…, not {head_sha256[:12]}…: an incomplete or"
                " replaced artifact"
            )

    # ---- writes --------------------------------------------------------------------------
    def register(
        self,
        project: int,
        artifact_dir: Path,
        *,
        model_version: str,
        head_sha256: str,
        metrics: dict[str, Any],
        job_id: int | None = None,
        snapshot: str = "",
    ) -> Version:
        """Records a complete version folder as the project's next version (``v<N>``),
        inactive. Refuses a folder outside ``heads_dir(data_dir, project)``, one without
        ``head.safetensors``, or one whose head's sha256 is not ``head_sha256``."""
        if isinstance(project, bool) or not isinstance(project, int):
            raise VersionError(f"a version needs an integer project, not {project!r}")
        if not model_version:
            raise VersionError("a version needs the model_version its predictions carry")
        try:
            text = json.dumps(dict(metrics), allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise VersionError(f"metrics must be a JSON object: {exc}") from None
        artifact = self._relative(project, artifact_dir)
        self._check_head(self.data_dir / artifact, head_sha256)
        with self._write() as db:
            db.execute(
                "INSERT INTO version_numbers (project, last) VALUES (?, 1)"
                " ON CONFLICT (project) DO UPDATE SET last = last + 1",
                (project,),
            )
            sql = "SELECT last FROM version_numbers WHERE project = ?"
            name = f"v{db.execute(sql, (project,)).fetchone()['last']}"
            try:
                db.execute(
                    "INSERT INTO versions (project, name, artifact, head_sha256, model_version,"
                    " metrics, job_id, snapshot, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (project, name, artifact, head_sha256.lower(), model_version, text, job_id,
                     snapshot, self._clock()),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                raise VersionError(f"{artifact} is already a registered version") from None
            return self._load(db, project, name)

    def activate(self, project: int, name: str) -> Version:
        """Makes ``name`` the project's active version in one transaction (promotion or
        rollback). Its head file is checked first: a damaged folder is never activated."""
        with closing(self._connect()) as db:
            checked = self._load(db, project, name)  # unknown: the error lists the known ones
        self._check_head(self.artifact_path(checked), checked.head_sha256)
        with self._write() as db:
            version = self._load(db, project, name)  # pruned meanwhile: UnknownVersionError
            db.execute(_CLEAR_ACTIVE, (project,))
            sql = "UPDATE versions SET active = 1, activated_at = ? WHERE id = ?"
            db.execute(sql, (self._clock(), version.id))
            return self._load(db, project, name)

    def deactivate(self, project: int) -> Version | None:
        """Back to the zero-shot method: no active version. Returns the one that was."""
        with self._write() as db:
            row = db.execute(
                "SELECT * FROM versions WHERE project = ? AND active = 1", (project,)
            ).fetchone()
            db.execute(_CLEAR_ACTIVE, (project,))
            return None if row is None else _version(row)

    def pin(self, project: int, name: str, pinned: bool = True) -> Version:
        """Pins (or unpins) a version: pruning keeps pinned versions."""
        with self._write() as db:
            version = self._load(db, project, name)
            db.execute("UPDATE versions SET pinned = ? WHERE id = ?", (int(pinned), version.id))
            return self._load(db, project, name)

    def prune(self, project: int, keep: int = 3) -> builtins.list[Version]:
        """Deletes versions that are not active, not pinned and not among the newest ``keep``:
        the rows in one transaction, then their folders; then removes orphan folders. Returns
        the deleted versions."""
        if keep < 0:
            raise VersionError(f"keep must be 0 or more, not {keep}")
        with self._write() as db:
            sql = "SELECT * FROM versions WHERE project = ? ORDER BY id DESC"
            rows = [_version(r) for r in db.execute(sql, (project,)).fetchall()]
            doomed = [v for v in rows[keep:] if not (v.active or v.pinned)]
            db.executemany("DELETE FROM versions WHERE id = ?", [(v.id,) for v in doomed])
        for version in doomed:
            self._remove_folder(project, self.artifact_path(version))
        for folder in self.orphans(project):
            self._remove_folder(project, folder)
        return doomed

    def _remove_folder(self, project: int, folder: Path) -> None:
        """Deletes a folder, only if it is inside the project's ``heads_dir``."""
        resolved = folder.resolve()
        if resolved.parent == heads_dir(self.data_dir, project).resolve():
            shutil.rmtree(resolved, ignore_errors=True)

    # ---- reads ---------------------------------------------------------------------------
    def orphans(self, project: int, min_age: float = ORPHAN_GRACE_SECONDS) -> builtins.list[Path]:
        """Folders in the project's ``heads_dir`` that no row names (a prune or install that
        crashed), unchanged for at least ``min_age`` seconds."""
        parent = heads_dir(self.data_dir, project)
        if not parent.is_dir():
            return []
        sql = "SELECT artifact FROM versions WHERE project = ?"
        with closing(self._connect()) as db:
            named = {r["artifact"] for r in db.execute(sql, (project,)).fetchall()}
        now, root = self._clock(), self.data_dir.resolve()
        return sorted(
            folder
            for folder in parent.iterdir()
            if folder.is_dir() and not folder.is_symlink()
            and folder.resolve().relative_to(root).as_posix() not in named
            and now - folder.stat().st_mtime >= min_age
        )  # fmt: skip

    def get(self, project: int, name: str) -> Version | None:
        """The version ``name`` of ``project``, or None."""
        found = self._select("SELECT * FROM versions WHERE project = ? AND name = ?", project, name)
        return found[0] if found else None

    def active(self, project: int) -> Version | None:
        """The project's active version, or None (it uses its zero-shot method)."""
        found = self._select("SELECT * FROM versions WHERE project = ? AND active = 1", project)
        return found[0] if found else None

    def list(self, project: int | None = None) -> builtins.list[Version]:
        """Versions newest first, of one project when given."""
        sql = "SELECT * FROM versions WHERE (? IS NULL OR project = ?) ORDER BY id DESC"
        return self._select(sql, project, project)
