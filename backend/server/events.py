"""Webhook events in the data directory's SQLite database, so nothing Label Studio sends is lost.

``/webhook`` must answer within Label Studio's 1 s, so it only records: one row per event
(action, project id, task and annotation ids, the body verbatim). The body is stored before any
field is read, so an odd field (an id past SQLite's 64-bit integers, a string where a list was
expected) costs that field, never the event. The training issue reads them. SQLite in WAL mode
lets the server write while a trainer reads.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAINING_ACTIONS = (
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATIONS_DELETED",
    "START_TRAINING",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    action TEXT NOT NULL,
    project_id INTEGER,
    task_ids TEXT NOT NULL,
    annotation_ids TEXT NOT NULL,
    payload TEXT NOT NULL
)
"""


_SQLITE_INT = range(-(2**63), 2**63)


def _id(raw: Any) -> int | None:
    """An id SQLite can hold, or None (bools, floats, strings and huge numbers are not ids)."""
    ok = isinstance(raw, int) and not isinstance(raw, bool) and raw in _SQLITE_INT
    return raw if ok else None


def _ids(value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    found = (_id(item.get("id") if isinstance(item, dict) else item) for item in items)
    return [i for i in found if i is not None]


def event_ids(payload: dict[str, Any]) -> tuple[int | None, list[int], list[int]]:
    """(project id, task ids, annotation ids) of a webhook payload, as far as they parse."""
    project = payload.get("project")
    annotations = payload.get("annotation", payload.get("annotations", []))
    return (
        _id(project.get("id")) if isinstance(project, dict) else None,
        _ids(payload.get("task", payload.get("tasks", []))),
        _ids(annotations),
    )


def _fields(payload: dict[str, Any]) -> tuple[int | None, str, str]:
    """(project id, task ids JSON, annotation ids JSON) of a payload, as far as they parse."""
    project_id, task_ids, annotation_ids = event_ids(payload)
    return project_id, json.dumps(task_ids), json.dumps(annotation_ids)


class EventStore:
    """Append-only event table; safe across threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction (committed on success), always closed."""
        with closing(sqlite3.connect(self.path, timeout=10)) as db, db:
            yield db

    def record(self, raw: str, payload: dict[str, Any]) -> int:
        """Stores one webhook: its raw body first, then the fields that parse; returns its id.

        ``raw`` is the body as received (kept verbatim, so nothing Label Studio sent is lost
        when a field is odd); ``payload`` is its parsed JSON object.
        """
        action = payload.get("action")
        with self._lock, self._connect() as db:
            cursor = db.execute(
                "INSERT INTO events (received_at, action, task_ids, annotation_ids, payload)"
                " VALUES (?, ?, '[]', '[]', ?)",
                (time.time(), action if isinstance(action, str) else "", raw),
            )
            event_id = int(cursor.lastrowid or 0)
            try:
                project_id, task_ids, annotation_ids = _fields(payload)
            except Exception as exc:  # a payload we cannot read is still stored, raw
                log.warning("event %d stored without ids: %s", event_id, type(exc).__name__)
                return event_id
            db.execute(
                "UPDATE events SET project_id = ?, task_ids = ?, annotation_ids = ? WHERE id = ?",
                (project_id, task_ids, annotation_ids, event_id),
            )
            return event_id

    def all(self) -> list[dict[str, Any]]:
        """Every event, oldest first (ids decoded, payload left as JSON text)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM events ORDER BY id").fetchall()
        return [
            {
                **dict(r),
                "task_ids": json.loads(r["task_ids"]),
                "annotation_ids": json.loads(r["annotation_ids"]),
            }
            for r in rows
        ]
