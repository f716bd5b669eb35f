"""Webhook events in the data directory's SQLite database, so nothing Label Studio sends is lost.

``/webhook`` must answer within Label Studio's 1 s, so it only records: one row per event
(action, project id, task and annotation ids, the payload as JSON). The training issue reads
them. SQLite in WAL mode lets the server write while a trainer reads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

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


def _ids(value: Any) -> list[int]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        raw = item.get("id") if isinstance(item, dict) else item
        if isinstance(raw, int):
            out.append(raw)
    return out


class EventStore:
    """Append-only event table; safe across threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def record(self, payload: dict[str, Any]) -> int:
        """Stores one webhook payload; returns its row id."""
        project = payload.get("project")
        project_id = project.get("id") if isinstance(project, dict) else None
        annotations = payload.get("annotation", payload.get("annotations", []))
        row = (
            time.time(),
            str(payload.get("action", "")),
            project_id if isinstance(project_id, int) else None,
            json.dumps(_ids(payload.get("task", payload.get("tasks", [])))),
            json.dumps(_ids(annotations)),
            json.dumps(payload),
        )
        with self._lock, self._connect() as db:
            cursor = db.execute(
                "INSERT INTO events (received_at, action, project_id, task_ids, annotation_ids,"
                " payload) VALUES (?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid or 0)

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
