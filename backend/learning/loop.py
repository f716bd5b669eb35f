"""The learning loop inside the server: webhooks in, trained versions out, nothing blocking.

- :meth:`LearningLoop.on_webhook` runs on the webhook thread after the event is stored: it
  updates the project's trigger state (``triggers.py``, persisted in the ``triggers`` table of
  the data directory's SQLite) and, for ``START_TRAINING``, queues a job at once. Two SQLite
  writes: ``/webhook`` still answers in milliseconds (Label Studio gives up after 1 s).
- :meth:`LearningLoop.tick`, every ``poll_seconds`` on the loop's own thread: re-queues jobs
  whose worker died (``JobStore.recover_stale``), queues the projects whose triggers are due
  (debounced bursts, the schedule), and runs one claimed job to its end (``worker.run_job``:
  training and scoring in subprocesses, then the gate).
- A job per project at most is queued or running (the jobs table's unique index), so a burst
  of edits or a second click on "Start training" gives one job.

Several replicas may share one data directory: claims are atomic and leases expire, so only
one replica trains a given job, and a replica killed mid-job leaves it to be re-queued. At
most ``max_running`` jobs (default 1) train at once across all of them: training takes a
machine's cores or its GPU, and replicas on one host would fight for them.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import database as sqlite_file
from .jobs import Job, JobStore
from .triggers import START, TriggerPolicy, TriggerState, after_queued, due, on_event
from .versions import VersionStore
from .worker import WorkerSettings, run_job

log = logging.getLogger(__name__)

TRIGGERS_SCHEMA = """
CREATE TABLE IF NOT EXISTS triggers (
    project INTEGER PRIMARY KEY,
    state TEXT NOT NULL
)
"""


class LearningLoop:
    """See the module docstring. ``client_factory()`` returns a Label Studio SDK client."""

    def __init__(
        self,
        database: Path,
        settings: WorkerSettings,
        policy: TriggerPolicy,
        client_factory: Callable[[], Any],
        *,
        lease_seconds: float = 120.0,
        max_running: int | None = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database, self.settings, self.policy = database, settings, policy
        self.max_running = max_running
        self.client_factory, self.lease_seconds, self.clock = client_factory, lease_seconds, clock
        self.jobs = JobStore(database, clock=clock)
        self.versions = VersionStore(database, settings.data_dir, clock=clock)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        sqlite_file.create(database, TRIGGERS_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite_file.connect(self.database)

    # ---- webhook thread ---------------------------------------------------------------
    def on_webhook(self, action: str, project: int | None, annotation_ids: list[int]) -> None:
        """Records what a stored webhook means for its project's training (module docstring)."""
        if project is None:
            return
        now = self.clock()
        state = self._state(project)
        ids: list[int | None] = list(annotation_ids) or [None]
        for annotation in ids:
            state = on_event(state, action, annotation, now)
        if action == START:
            self._queue(project, "START_TRAINING", state, now)
        else:
            self._save(project, state)

    # ---- loop thread ------------------------------------------------------------------
    def tick(self) -> Job | None:
        """Recovers stale jobs, queues due triggers, runs one job; returns the job it ran."""
        for stale in self.jobs.recover_stale():
            log.warning("training job %d re-queued or failed: %s", stale.id, stale.state.value)
        now = self.clock()
        for project, state in self._states():
            reason = due(state, now, self.policy)
            if reason is not None:
                self._queue(project, reason, state, now)
        job = self.jobs.claim(self.owner, self.lease_seconds, max_running=self.max_running)
        if job is None:
            return None
        log.info("training job %d for project %d started", job.id, job.project)
        try:
            done = run_job(job, self.owner, self.jobs, self.versions, self.settings,
                           self.client_factory())  # fmt: skip
        except Exception as exc:  # any failure fails the job, never the server
            log.exception("training job %d failed", job.id)
            done = self.jobs.release(job.id, self.owner, f"{type(exc).__name__}: {exc}")
        log.info("training job %d: %s %s", done.id, done.state.value, done.reason)
        return done

    def start(self) -> None:
        """Runs :meth:`tick` every ``poll_seconds`` on a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="ovss-learning", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_seconds):
            try:
                self.tick()
            except Exception:  # the loop must survive a bad tick
                log.exception("learning loop tick failed")

    # ---- trigger state ------------------------------------------------------------------
    def _queue(self, project: int, reason: str, state: TriggerState, now: float) -> None:
        job = self.jobs.enqueue(project, inputs={"trigger": reason})
        log.info("training job %d queued for project %d: %s", job.id, project, reason)
        self._save(project, after_queued(state, now))

    def _state(self, project: int) -> TriggerState:
        return _trigger_state(self.database, project)

    def _states(self) -> list[tuple[int, TriggerState]]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT project, state FROM triggers").fetchall()
        return [(int(p), TriggerState.from_dict(json.loads(s))) for p, s in rows]

    def _save(self, project: int, state: TriggerState) -> None:
        _save_trigger_state(self.database, project, state)


def queue_training(
    database: Path, project: int, reason: str, *, clock: Callable[[], float] = time.time
) -> tuple[Job, bool]:
    """Queues a training job for ``project`` from any process sharing the data directory
    (``ovss-label train --project ID --queue``), as ``START_TRAINING`` does: the project's
    trigger state is reset, so annotations already counted do not queue a second job. Returns
    the job and whether it is new (False: the project's queued or running job, unchanged)."""
    sqlite_file.create(database, TRIGGERS_SCHEMA)
    jobs = JobStore(database, clock=clock)
    newest = max((j.id for j in jobs.list(limit=1)), default=0)
    job = jobs.enqueue(project, inputs={"trigger": reason})
    created = job.id > newest  # else enqueue returned the project's active job
    if created:
        state = after_queued(_trigger_state(database, project), clock())
        _save_trigger_state(database, project, state)
    return job, created


def _trigger_state(database: Path, project: int) -> TriggerState:
    with closing(sqlite_file.connect(database)) as db:
        row = db.execute("SELECT state FROM triggers WHERE project = ?", (project,)).fetchone()
    return TriggerState.from_dict(json.loads(row[0])) if row else TriggerState()


def _save_trigger_state(database: Path, project: int, state: TriggerState) -> None:
    with closing(sqlite_file.connect(database)) as db:
        db.execute(
            "INSERT INTO triggers (project, state) VALUES (?, ?) ON CONFLICT(project) DO "
            "UPDATE SET state = excluded.state",
            (project, json.dumps(asdict(state))),
        )
