"""Annotation snapshots: the immutable, split record of what one training job learns from.

Format contract
===============
Input: a Label Studio JSON export (``converters/ls_tasks.py``): tasks ``{"id", "data",
"meta"?, "annotations": [...], "predictions": [...]}``, annotations ``{"id", "result",
"was_cancelled", "created_at", "updated_at"}``. Per task the *accepted* annotation is
``ls_tasks.pick_record``'s: the latest (``updated_at``, ``created_at``, ``id``) not cancelled,
even with an empty result ("nothing here" is a label). Predictions and drafts are dropped
unread: a model never trains on its own output. Tasks without an accepted annotation are left
out. Task and annotation ids are Label Studio's integer ids.

A snapshot holds, sorted by task id:

- ``tasks``: minimal export tasks ``{"id", "data", "meta"?, "annotations": [{"id", "result",
  "updated_at", "created_at"}]}`` (the accepted annotation only), which
  ``evaluation.sources.label_studio_ground_truth`` and the training data readers take as is;
- ``entries``: ``(task id, annotation id, updated_at)`` per task, what identifies the data;
- ``held_out`` / ``train``: ``learning.split.split_tasks(task ids, fraction)``: sticky, so
  every version of a project is scored on the same held-out tasks;
- ``digest``: sha256 of the canonical JSON (sorted keys, no spaces) of ``{"entries",
  "label_config", "fraction", "held_out"}``. The same annotations give the same digest
  whatever the order of the export; an edit (a new ``updated_at``) gives another one.

File: ``<folder>/<digest[:16]>.json``, one JSON object: ``format`` (``"ovss-label-snapshot"``),
``version`` (1), the fields above, ``project``, ``created_at`` (Unix seconds) and
``content_sha256`` (sha256 of the canonical JSON of every other field). Written atomically and
never replaced: a second write of the same digest leaves the first file alone (it keeps its
``created_at``); a different file under that name is an error. Reading checks the digest, the
content hash and that entries, split and tasks agree, so a tampered or truncated file fails.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeGuard

from ovss_label.converters.coco import write_bytes_atomic
from ovss_label.converters.ls_tasks import pick_record

from .split import HELD_OUT_FRACTION, split_tasks

__all__ = [
    "FORMAT",
    "Entry",
    "Part",
    "Snapshot",
    "new_annotations_since",
    "pull_snapshot",
    "read_snapshot",
    "take_snapshot",
    "tasks_of",
    "write_snapshot",
]

FORMAT, VERSION = "ovss-label-snapshot", 1
Entry = tuple[int, int, str | None]
"""(task id, annotation id, the annotation's ``updated_at`` as exported)."""
Part = Literal["train", "held_out", "all"]
_ANNOTATION_KEYS = ("id", "result", "updated_at", "created_at")


@dataclass(frozen=True)
class Snapshot:
    """One project's accepted annotations at one moment (module docstring).

    Attributes:
        project: Label Studio project id.
        created_at: when it was taken, Unix seconds.
        label_config: the project's labeling config XML at that moment.
        fraction: the held-out fraction ``split_tasks`` was given.
        tasks: minimal export tasks, sorted by task id; treat as read-only (``tasks_of``
            hands out copies).
        entries: ``(task id, annotation id, updated_at)``, sorted by task id.
        held_out: held-out task ids, sorted.
        train: training task ids, sorted.
        digest: sha256 hex of the data's identity (module docstring).
    """

    project: int
    created_at: float
    label_config: str
    fraction: float
    tasks: tuple[dict[str, Any], ...]
    entries: tuple[Entry, ...]
    held_out: tuple[int, ...]
    train: tuple[int, ...]
    digest: str


def take_snapshot(
    tasks: Iterable[Any],
    label_config: str,
    project: int,
    *,
    fraction: float = HELD_OUT_FRACTION,
    now: float,
) -> Snapshot:
    """The snapshot of an exported task list (pure: ``now`` is the clock, Unix seconds).

    Raises:
        ValueError: Not a JSON export (a task is not an object with ``data``), a task with an
            accepted annotation but no integer id, an annotation without an integer id, two
            tasks with one id, or ``fraction`` outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    minimal: dict[int, dict[str, Any]] = {}
    for task_id, task, annotation in _accepted(tasks):
        if task_id in minimal:
            raise ValueError(f"task {task_id} appears twice in the export")
        minimal[task_id] = _minimal_task(task, annotation)
    ordered = tuple(minimal[t] for t in sorted(minimal))
    return _build(project, float(now), str(label_config), float(fraction), ordered)


def write_snapshot(snapshot: Snapshot, folder: str | os.PathLike[str]) -> Path:
    """Writes ``folder/<digest[:16]>.json`` (atomically, read-only) and returns its path.

    Idempotent: when the file is there with the same digest it is left as it is.

    Raises:
        ValueError: The file is there but is another snapshot or not a valid one; it is
            never overwritten.
    """
    path = Path(folder) / f"{snapshot.digest[:16]}.json"
    data = (json.dumps(_body(snapshot), ensure_ascii=False, indent=1) + "\n").encode()
    if not path.exists() and _create_exclusive(path, data):
        return path
    try:
        existing = read_snapshot(path)
    except ValueError as err:
        raise ValueError(
            f"{path} exists and is not a valid snapshot; not overwritten: {err}"
        ) from err
    if existing.digest != snapshot.digest:
        raise ValueError(
            f"{path} holds another snapshot (digest {existing.digest[:16]}...); not overwritten"
        )
    return path


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """The snapshot in ``path``, checked (module docstring).

    Raises:
        ValueError: The file is not JSON, not a snapshot of this version, or does not match
            its digest or content hash (tampered or truncated); the message names it.
        OSError: The file cannot be read.
    """
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a snapshot file (truncated or not JSON: {err})") from err
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file")
    if body.get("version") != VERSION:
        raise ValueError(f"{path}: snapshot version {body.get('version')!r}, expected {VERSION}")
    content = {k: v for k, v in body.items() if k != "content_sha256"}
    if body.get("content_sha256") != _sha256(content):
        raise ValueError(f"{path}: content does not match its hash (the file was changed)")
    try:
        tasks = tuple(body["tasks"])
        snapshot = _build(body["project"], body["created_at"], body["label_config"],
                          body["fraction"], tasks, held=body["held_out"])  # fmt: skip
        stored = tuple(tuple(e) for e in body["entries"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed snapshot: {err}") from err
    if stored != snapshot.entries or body["train"] != list(snapshot.train):
        raise ValueError(f"{path}: entries or split do not match its tasks (the file was changed)")
    if body.get("digest") != snapshot.digest:
        raise ValueError(f"{path}: digest does not match its data (the file was changed)")
    return snapshot


def tasks_of(snapshot: Snapshot, part: Part = "train") -> list[dict[str, Any]]:
    """Export-shaped copies of the tasks of one part (``"train"``, ``"held_out"``, ``"all"``),
    sorted by task id, for ``label_studio_ground_truth`` and the training data readers.

    Raises:
        ValueError: An unknown ``part``.
    """
    if part == "all":
        return copy.deepcopy(list(snapshot.tasks))
    if part not in ("train", "held_out"):
        raise ValueError(f"part must be 'train', 'held_out' or 'all', got {part!r}")
    wanted = set(snapshot.train if part == "train" else snapshot.held_out)
    return copy.deepcopy([t for t in snapshot.tasks if t["id"] in wanted])


def new_annotations_since(tasks: Iterable[Any], snapshot: Snapshot | None) -> list[int]:
    """Ids (sorted) of the annotations accepted in ``tasks`` now that ``snapshot`` does not
    hold at the same ``updated_at``: new ones, edited ones (they count again) and older ones
    that became the accepted one when a later one was deleted or cancelled. Deleted
    annotations count for nothing. Every accepted annotation when ``snapshot`` is None.

    Raises:
        ValueError: As ``take_snapshot`` for a task or annotation without an id.
    """
    known = set() if snapshot is None else {(a, u) for _, a, u in snapshot.entries}
    found = {a["id"] for _, _, a in _accepted(tasks) if (a["id"], _updated(a)) not in known}
    return sorted(found)


def pull_snapshot(
    client: Any,
    project: int,
    *,
    fraction: float = HELD_OUT_FRACTION,
    now: float,
    folder: str | os.PathLike[str],
) -> tuple[Snapshot, Path]:
    """Pulls the project's JSON export through the SDK (``lsapi.fetch_project_export``; its
    annotations only, predictions are never asked for), snapshots and writes it.

    Raises:
        LabelStudioError: Label Studio cannot be reached or refuses (the message says why).
        ValueError: As ``take_snapshot`` and ``write_snapshot``.
    """
    from ovss_label.lsapi import fetch_project_export

    tasks, label_config = fetch_project_export(client, project)
    snapshot = take_snapshot(tasks, label_config, project, fraction=fraction, now=now)
    return snapshot, write_snapshot(snapshot, folder)


def _accepted(tasks: Iterable[Any]) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """(task id, task, accepted annotation) for each task that has one, in export order."""
    found: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
    for position, task in enumerate(tasks, 1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise ValueError(f"task #{position} in the export is not a Label Studio task "
                             "(no 'data' object); export the project as JSON")  # fmt: skip
        annotation, _ = pick_record(task)
        if annotation is None:
            continue
        task_id = task.get("id")
        if not _is_id(task_id):
            raise ValueError(f"task #{position} in the export has an annotation but no task id")
        if not _is_id(annotation.get("id")):
            raise ValueError(f"task {task_id}: its annotation has no integer id")
        found.append((task_id, task, annotation))
    return found


def _minimal_task(task: dict[str, Any], annotation: dict[str, Any]) -> dict[str, Any]:
    kept = {k: copy.deepcopy(annotation.get(k)) for k in _ANNOTATION_KEYS}
    kept["result"] = kept["result"] or []
    minimal = {"id": task["id"], "data": copy.deepcopy(task["data"])}
    if task.get("meta"):
        minimal["meta"] = copy.deepcopy(task["meta"])
    minimal["annotations"] = [kept]
    return minimal


def _build(
    project: Any,
    created_at: Any,
    label_config: Any,
    fraction: Any,
    tasks: tuple[dict[str, Any], ...],
    held: Sequence[Any] | None = None,
) -> Snapshot:
    """The snapshot of minimal ``tasks`` (sorted by id); ``held`` is a stored split to keep
    (a file keeps the split it was written with), else ``split_tasks`` gives it."""
    if not _is_id(project) or not isinstance(label_config, str):
        raise ValueError("project must be an integer id and label_config a string")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a number, got {fraction!r}")
    if isinstance(created_at, bool) or not isinstance(created_at, (int, float)):
        raise ValueError(f"created_at must be Unix seconds, got {created_at!r}")
    entries = tuple(_entry(t) for t in tasks)
    ids = [e[0] for e in entries]
    if ids != sorted(set(ids)):
        raise ValueError("tasks must be sorted by id, each id once")
    if held is None:
        held = split_tasks(ids, float(fraction))[1]
    held_out = tuple(sorted(held))
    if not set(held_out) <= set(ids) or not 0.0 <= fraction <= 1.0:
        raise ValueError("held-out ids that are not tasks, or a fraction outside [0, 1]")
    chosen = set(held_out)
    train = tuple(t for t in ids if t not in chosen)
    identity = {"entries": entries, "label_config": label_config,
                "fraction": float(fraction), "held_out": held_out}  # fmt: skip
    return Snapshot(project, float(created_at), label_config, float(fraction), tasks,
                    entries, held_out, train, _sha256(identity))  # fmt: skip


def _entry(task: Any) -> Entry:
    annotations = task.get("annotations") if isinstance(task, dict) else None
    if not isinstance(annotations, list) or len(annotations) != 1:
        raise ValueError(f"a snapshot task has exactly one annotation: {str(task)[:80]}")
    annotation = annotations[0]
    if not _is_id(task.get("id")) or not _is_id(annotation.get("id")):
        raise ValueError(f"a snapshot task and its annotation need integer ids: {str(task)[:80]}")
    return task["id"], annotation["id"], _updated(annotation)


def _updated(annotation: dict[str, Any]) -> str | None:
    value = annotation.get("updated_at")
    return None if value is None else str(value)


def _is_id(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _body(snapshot: Snapshot) -> dict[str, Any]:
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "project": snapshot.project,
        "created_at": snapshot.created_at,
        "digest": snapshot.digest,
        "fraction": snapshot.fraction,
        "label_config": snapshot.label_config,
        "entries": [list(e) for e in snapshot.entries],
        "held_out": list(snapshot.held_out),
        "train": list(snapshot.train),
        "tasks": list(snapshot.tasks),
    }
    # Hashed as it reads back: JSON turns tuples into lists.
    body["content_sha256"] = _sha256(json.loads(json.dumps(body)))
    return body


def _sha256(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Writes ``data`` to ``path`` only if no file is there (False if one is), atomically:
    a temp file, fsynced, then hard-linked to the name (a link never replaces a file, so two
    jobs racing on one snapshot cannot overwrite each other). Falls back to an atomic rename
    where the filesystem has no hard links."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if path.exists():
                return False
            write_bytes_atomic(path, data)
            os.chmod(path, 0o444)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)
