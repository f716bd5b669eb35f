"""Training jobs that survive restarts: a state machine in the data directory's SQLite.

The ``jobs`` table lives in the server's database (``store.events_path(data_dir)``), one
short transaction per call: a restarted server, worker threads and replicas on one file all
see one queue. The only transitions::

    queued  --claim-->          running    (a worker takes the lease; attempts + 1)
    queued  --cancel-->         cancelled  (nothing ran yet: at once)
    running --finish-->         done | failed | rejected | cancelled  (by the lease holder)
    running --release/recover-> queued     (attempts left: tried again)
    running --release/recover-> failed     ("gave up after 3 attempts: <last reason>")
    running --recover-->        cancelled  (a cancel was requested and its worker is gone)

The last four states are final: a finished job never runs again (new corrections enqueue a
new one). At most one active (queued or running) job per project and kind: a partial UNIQUE
index enforces it, so two processes racing to enqueue cannot both insert.

The lease: ``claim`` gives the job to ``owner`` (unique per worker: host, pid, a random part)
until ``lease_expires_at``; each ``heartbeat`` moves that to now + ``lease_seconds``. A lease
is held until a call takes it away, so an owner heartbeating late, before ``recover_stale``
ran, keeps its job. ``recover_stale`` (on server start, then periodically) takes back jobs
whose lease expired: their worker died with the server, was killed, or hangs.

Cancelling a running job: ``cancel`` sets ``cancel_requested``; the worker's next
``heartbeat`` returns False; the worker kills its subprocess's process group (``runner``
does when ``on_tick`` returns False), then calls ``finish(job_id, owner, "cancelled")``. If
that raises :class:`JobError` the lease was lost instead, the job is someone else's, and the
worker just stops. ``recover_stale`` cancels (not re-queues) such a job whose worker died.

Connections: a new one per call, as ``server/events.py`` does: calls are rare (a heartbeat
every few seconds), a connection costs well under a millisecond, and nothing is shared, so
any thread may call any method. Writes begin ``BEGIN IMMEDIATE``: the write lock is taken
before the first read, so two workers never see the same queued job, and a busy file waits
(``busy_timeout``) rather than fails. WAL lets readers run beside the writer.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, closing
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from . import database as sqlite_file

JSONObject = dict[str, Any]
"""A JSON object: a job's inputs and result."""

"""How long a call waits for another process's write transaction before it fails."""


class JobState(str, Enum):
    """Where a job is.

    Attributes:
        QUEUED: Waiting for a worker. Queued and running jobs are a project's active job.
        RUNNING: A worker holds the lease and heartbeats; training runs in its subprocess.
        DONE: Training finished and its result was accepted (the trained head was promoted).
        FAILED: Training failed (the reason says how), or its lease expired on every attempt.
        REJECTED: Training finished but the gate kept the current head (scored no better).
        CANCELLED: Cancelled by a user: before it ran, or its subprocess was killed.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


FINISH_STATES = (JobState.DONE, JobState.FAILED, JobState.REJECTED, JobState.CANCELLED)
"""The final states; the lease holder moves a running job to one of them with ``finish``."""

JOBS_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, project INTEGER NOT NULL, kind TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('queued', 'running', 'done', 'failed', 'rejected', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL,
    inputs TEXT NOT NULL, result TEXT, reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    lease_owner TEXT, lease_seconds REAL, lease_expires_at REAL, heartbeat_at REAL,
    pid INTEGER, progress REAL, cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_one_active ON jobs (project, kind)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_by_project ON jobs (project, id);
"""
"""The ``jobs`` table: one row per job; JSON text in ``inputs`` and ``result``."""


class JobError(ValueError):
    """A transition the state machine does not allow, or a bad argument (one-line message)."""


class UnknownJobError(JobError):
    """No job has that id (the HTTP layer answers 404, not 409)."""


@dataclass(frozen=True)
class Job:
    """One row of the ``jobs`` table, as plain values.

    Attributes:
        id: The job's id (grows with insertion: a larger id is a newer job).
        project: The Label Studio project id.
        kind: What the job does (``train``).
        state: See :class:`JobState`.
        attempts: How many times a worker claimed it.
        max_attempts: Claims allowed before a stale lease fails it.
        inputs: What the job was asked to do (JSON object).
        result: What the worker reported (JSON object; None until finished).
        reason: Why it failed, was rejected, cancelled or re-queued ("" otherwise).
        created_at: When it was enqueued (clock seconds).
        updated_at: Its last change.
        lease_owner: The worker that holds (or last held) it.
        lease_seconds: The lease length a heartbeat extends by.
        lease_expires_at: When the lease lapses unless heartbeated (None when not running).
        heartbeat_at: The worker's last heartbeat.
        pid: The training subprocess's pid (its process group id), once reported.
        progress: Fraction done in [0, 1], once reported.
        cancel_requested: A user asked to cancel it while it ran.
    """

    id: int
    project: int
    kind: str
    state: JobState
    attempts: int
    max_attempts: int
    inputs: JSONObject
    result: JSONObject | None
    reason: str
    created_at: float
    updated_at: float
    lease_owner: str | None
    lease_seconds: float | None
    lease_expires_at: float | None
    heartbeat_at: float | None
    pid: int | None
    progress: float | None
    cancel_requested: bool

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-able values (``GET /jobs``, ``ovss-label jobs``)."""
        return {**asdict(self), "state": self.state.value}


def _job(row: sqlite3.Row) -> Job:
    v = dict(row)
    v.update(state=JobState(v["state"]), cancel_requested=bool(v["cancel_requested"]))
    v.update(inputs=json.loads(v["inputs"]), result=v["result"] and json.loads(v["result"]))
    return Job(**v)


def _json_object(name: str, value: Any) -> str:
    """``value`` as JSON text; it must be an object of JSON values (no NaN, no sets, no paths)."""
    if not isinstance(value, dict):
        raise JobError(f"{name} must be a JSON object (a dict), not {type(value).__name__}")
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise JobError(f"{name} must be JSON: {exc}") from None


_NO_LEASE: JSONObject = {"lease_owner": None, "lease_expires_at": None, "pid": None}


def _set(db: sqlite3.Connection, job_id: int, now: float, **values: Any) -> None:
    """Updates columns of one job (names from this module only) and its ``updated_at``."""
    sql = "UPDATE jobs SET " + "".join(f"{name} = ?, " for name in values)
    db.execute(sql + "updated_at = ? WHERE id = ?", (*values.values(), now, job_id))


class JobStore:
    """The ``jobs`` table of one SQLite file; safe across threads, processes and restarts."""

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, max_attempts: int = 3
    ) -> None:
        """Opens (creating if needed) the table in ``path``.

        Args:
            path: The SQLite file (the data directory's ``events.sqlite``).
            clock: Seconds now; every timestamp and lease comes from it (tests pass a fake).
            max_attempts: Claims a job enqueued here gets before a stale lease fails it.
        """
        if max_attempts < 1:
            raise JobError(f"max_attempts must be at least 1, not {max_attempts}")
        self.path = path
        self.max_attempts = max_attempts
        self._clock = clock
        sqlite_file.create(path, JOBS_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite_file.connect(self.path)

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return sqlite_file.write(self.path)

    @staticmethod
    def _load(db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJobError(f"no job {job_id}")
        return _job(row)

    def enqueue(self, project: int, kind: str = "train", inputs: JSONObject | None = None) -> Job:
        """A new queued job, or the project's active (queued or running) job of that kind: the
        partial UNIQUE index refuses the insert when one exists, and that job comes back."""
        if isinstance(project, bool) or not isinstance(project, int) or not kind:
            raise JobError(f"a job needs an integer project and a kind, not {project!r}, {kind!r}")
        text = _json_object("inputs", {} if inputs is None else inputs)
        with self._write() as db:
            now = self._clock()
            try:
                cursor = db.execute(
                    "INSERT INTO jobs (project, kind, state, max_attempts, inputs, created_at,"
                    " updated_at) VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                    (project, kind, self.max_attempts, text, now, now),
                )
            except sqlite3.IntegrityError:
                sql = "SELECT * FROM jobs WHERE project = ? AND kind = ? AND state IN (?, ?)"
                active = db.execute(sql, (project, kind, "queued", "running")).fetchone()
                if active is None:  # another constraint failed: not ours to hide
                    raise
                return _job(active)
            return self._load(db, int(cursor.lastrowid or 0))

    def claim(
        self, owner: str, lease_seconds: float, *, kind: str | None = None,
        max_running: int | None = None,
    ) -> Job | None:  # fmt: skip
        """Takes the oldest queued job (of ``kind``, when given): running, attempts + 1, the
        lease to ``owner`` for ``lease_seconds``. None when nothing is queued, or when
        ``max_running`` jobs (of ``kind``) already run under a live lease (one whose lease
        lapsed does not count: it is for ``recover_stale``).

        One ``BEGIN IMMEDIATE`` transaction reads and updates, so concurrent workers (threads,
        processes, replicas on one file) never claim the same job, nor together pass
        ``max_running``.
        """
        if not owner or lease_seconds <= 0:
            raise JobError(f"claim needs an owner and a lease > 0, not {owner!r}, {lease_seconds}")
        with self._write() as db:
            now = self._clock()
            if max_running is not None and self._running(db, kind, now) >= max_running:
                return None
            sql = "SELECT id FROM jobs WHERE state = 'queued' AND kind = COALESCE(?, kind)"
            row = db.execute(sql + " ORDER BY id LIMIT 1", (kind,)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?,"
                " lease_seconds = ?, lease_expires_at = ?, heartbeat_at = ?, updated_at = ?,"
                " pid = NULL, progress = NULL WHERE id = ?",
                (owner, lease_seconds, now + lease_seconds, now, now, row["id"]),
            )
            return self._load(db, row["id"])

    @staticmethod
    def _running(db: sqlite3.Connection, kind: str | None, now: float) -> int:
        sql = ("SELECT COUNT(*) FROM jobs WHERE state = 'running' AND kind = COALESCE(?, kind)"
               " AND lease_expires_at > ?")  # fmt: skip
        count: int = db.execute(sql, (kind, now)).fetchone()[0]
        return count

    def heartbeat(
        self, job_id: int, owner: str, progress: float | None = None, pid: int | None = None
    ) -> bool:
        """Extends ``owner``'s lease by its ``lease_seconds``, recording progress and pid.

        Returns:
            True: keep going. False: stop. Either ``owner`` no longer holds the lease (the job
            was re-queued, finished or taken: nothing was written, do not finish it), or a
            cancel was requested (the lease was extended: kill the subprocess, then
            ``finish(job_id, owner, "cancelled")``).
        """
        if progress is not None and not 0.0 <= progress <= 1.0:
            raise JobError(f"progress must be a fraction in [0, 1], not {progress}")
        with self._write() as db:
            now = self._clock()
            cursor = db.execute(
                "UPDATE jobs SET heartbeat_at = ?, lease_expires_at = ? + lease_seconds,"
                " updated_at = ?, progress = COALESCE(?, progress), pid = COALESCE(?, pid)"
                " WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (now, now, now, progress, pid, job_id, owner),
            )
            if cursor.rowcount == 0:
                return False
            return not self._load(db, job_id).cancel_requested

    def finish(
        self,
        job_id: int,
        owner: str,
        state: str,
        result: JSONObject | None = None,
        reason: str = "",
    ) -> Job:
        """Ends ``owner``'s running job in ``state`` (done, failed, rejected or cancelled).

        Only the lease holder may: a worker whose lease was taken away must not overwrite what
        the job's new worker (or ``recover_stale``) decided.
        """
        if state not in FINISH_STATES:
            raise JobError(f"a job finishes done, failed, rejected or cancelled; not {state!r}")
        text = None if result is None else _json_object("result", result)
        final, line = JobState(state).value, " ".join(reason.split())
        with self._write() as db:
            self._held(db, job_id, owner)
            now = self._clock()
            _set(db, job_id, now, state=final, result=text, reason=line, lease_expires_at=None)
            return self._load(db, job_id)

    def release(self, job_id: int, owner: str, reason: str) -> Job:
        """Gives ``owner``'s running job back: queued again when attempts are left (``reason``
        kept), else failed ("gave up after N attempts: reason"). For a transient failure (the
        subprocess killed for memory, the server shutting down)."""
        with self._write() as db:
            job = self._held(db, job_id, owner)
            self._requeue_or_fail(db, job, " ".join(reason.split()) or "released")
            return self._load(db, job_id)

    def cancel(self, job_id: int) -> Job:
        """Cancels a job: a queued one at once; a running one by setting ``cancel_requested``
        (its worker stops at the next heartbeat; see the module docstring). Cancelling a
        running job twice is the same as once; a finished job cannot be cancelled."""
        with self._write() as db:
            job = self._load(db, job_id)
            now = self._clock()
            if job.state is JobState.QUEUED:
                _set(db, job_id, now, state="cancelled", reason="cancelled before it ran")
            elif job.state is JobState.RUNNING:
                _set(db, job_id, now, cancel_requested=1)
            else:
                raise JobError(f"job {job_id} is already {job.state.value}: nothing to cancel")
            return self._load(db, job_id)

    def recover_stale(self) -> builtins.list[Job]:
        """Takes back running jobs whose lease expired (on server start, then periodically):
        queued again with attempts left, else failed ("gave up after 3 attempts: <last reason or
        'lease expired'>"); cancelled if a cancel was requested. Returns them as they are now."""
        with self._write() as db:
            now = self._clock()
            sql = "SELECT * FROM jobs WHERE state = 'running' AND lease_expires_at < ? ORDER BY id"
            rows = db.execute(sql, (now,)).fetchall()
            for row in rows:
                job = _job(row)
                if job.cancel_requested:
                    reason = "cancelled; its worker stopped"
                    _set(db, job.id, now, state="cancelled", reason=reason, lease_expires_at=None)
                else:
                    self._requeue_or_fail(db, job, "lease expired", job.reason)
            return [self._load(db, row["id"]) for row in rows]

    def _requeue_or_fail(self, db: sqlite3.Connection, job: Job, why: str, last: str = "") -> None:
        """running -> queued (lease cleared, ``why`` kept) or, out of attempts, -> failed
        with "gave up after N attempts: <last or why>"."""
        now = self._clock()
        if job.attempts < job.max_attempts:
            _set(db, job.id, now, state="queued", reason=why, **_NO_LEASE)
        else:
            gave_up = f"gave up after {job.attempts} attempts: {last or why}"
            _set(db, job.id, now, state="failed", reason=gave_up, lease_expires_at=None)

    def _held(self, db: sqlite3.Connection, job_id: int, owner: str) -> Job:
        """The running job ``owner`` holds the lease of; else :class:`JobError`."""
        job = self._load(db, job_id)
        if job.state is not JobState.RUNNING or job.lease_owner != owner:
            raise JobError(
                f"job {job_id} is {job.state.value} (lease: {job.lease_owner!r}):"
                f" only its lease holder, not {owner!r}, may end it"
            )
        return job

    def _select(self, sql: str, *params: Any) -> builtins.list[Job]:
        """Reads in autocommit: one statement sees one consistent snapshot (WAL)."""
        with closing(self._connect()) as db:
            return [_job(row) for row in db.execute(sql, params).fetchall()]

    def get(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        found = self._select("SELECT * FROM jobs WHERE id = ?", job_id)
        return found[0] if found else None

    def list(self, project: int | None = None, limit: int = 100) -> builtins.list[Job]:
        """Jobs newest first, of one project when given; at most ``limit``."""
        sql = "SELECT * FROM jobs WHERE (? IS NULL OR project = ?) ORDER BY id DESC LIMIT ?"
        return self._select(sql, project, project, limit)
