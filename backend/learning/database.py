"""The data directory's SQLite file, as the learning tables use it (jobs, versions, triggers).

A new connection per call: calls are rare (a heartbeat every second at most), a connection
costs well under a millisecond, and nothing is shared between threads. ``isolation_level=None``
so the module opens no transactions of its own; writes are explicit ``BEGIN IMMEDIATE``
transactions, which take the write lock before the first read (two workers or replicas can
never both claim one job). WAL lets readers run beside a writer; a busy file is waited for up
to ``BUSY_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

BUSY_TIMEOUT_SECONDS = 10.0


def create(path: Path, schema: str) -> None:
    """Creates the file (and its folder) if needed, in WAL mode, with ``schema``'s tables."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(schema)


def connect(path: Path) -> sqlite3.Connection:
    """A new connection (rows by name, no implicit transactions); the caller closes it."""
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
    db.row_factory = sqlite3.Row
    return db


@contextmanager
def write(path: Path) -> Iterator[sqlite3.Connection]:
    """A new connection in one ``BEGIN IMMEDIATE`` transaction: committed, or rolled back when
    the body raises; always closed."""
    with closing(connect(path)) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
