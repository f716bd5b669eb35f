"""The sticky held-out split: which tasks a trained version is scored on.

Every job of a project splits its snapshot with the same rule, so the candidate, the active
version and the zero-shot method are compared on the same held-out tasks, and a task that once
scored a version never becomes training data for the next one.

**Rule**: a task's *position* is the first 32 bits of ``sha256(salt + str(task_id))`` read as a
fraction of ``0xFFFFFFFF``; the task is held out when its position is below ``fraction``. The
position depends on nothing but the id and the salt, so a task's side never changes when other
tasks are added or removed, nor between jobs. Label Studio task ids are unique across the
projects of one instance, so the project is not part of the hash.

This is ``backend/training/data.py``'s ``split_items`` rule (same hash, same bits, same
guarantees) with a salt in front: with ``salt=""`` :func:`split_tasks` gives exactly its split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

HELD_OUT_FRACTION = 0.2
"""One task in five is held out: enough held-out tasks to compare versions once a project has a
few dozen annotated tasks, while four in five still train the head."""

SALT = "ovss-held-out-v1"
"""Prefixed to every id. Changing it reshuffles every project's split (a new version of the rule,
whose held-out scores are not comparable with the old ones), so it carries a version number."""

TaskId = TypeVar("TaskId", int, str)


def position(task_id: int | str, salt: str = SALT) -> float:
    """Where the task falls in [0, 1]: the first 32 bits of ``sha256(salt + str(task_id))``."""
    digest = hashlib.sha256(f"{salt}{task_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF


def held_out(task_id: int | str, fraction: float = HELD_OUT_FRACTION, salt: str = SALT) -> bool:
    """True when the task is held out under the plain rule (module docstring).

    This is the rule alone; :func:`split_tasks` may move one task across to keep both sides
    non-empty in a small project.
    """
    return position(task_id, salt) < fraction


def split_tasks(
    task_ids: Sequence[TaskId], fraction: float = HELD_OUT_FRACTION, salt: str = SALT
) -> tuple[list[TaskId], list[TaskId]]:
    """(train, held out), each in the input order, duplicates dropped.

    The plain rule (:func:`held_out`), plus two guarantees once there are two or more tasks
    (and ``fraction > 0``; ``fraction == 0`` holds nothing out):

    - at least one held-out task: if the rule holds none out, the task with the smallest
      position is held out. It stays the held-out one for as long as it exists and no task with
      a smaller position is added (in a project that small, adding a task may move it);
    - at least one training task: if the rule holds every task out, the one with the largest
      position trains.

    Once the rule alone gives both sides a task (about 25 tasks at the default fraction) the
    guarantees stop acting and every task's side is fixed for good.
    """
    ids = list(dict.fromkeys(task_ids))
    ranked = sorted(ids, key=lambda t: position(t, salt))
    held = [t for t in ranked if position(t, salt) < fraction]
    if len(ids) >= 2 and fraction > 0 and not held:
        held = ranked[:1]
    if len(held) == len(ids) >= 2:
        held = held[:-1]
    chosen = set(held)
    return [t for t in ids if t not in chosen], [t for t in ids if t in chosen]
