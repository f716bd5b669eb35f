"""Which model serves a project, and the built proposers of those choices.

A project with an active trained version (``learning/versions.py``) is served by ``fmbseg``
(``fmbseg+sam`` when its labeling config's method ends with ``+sam``) with that version's head
file; any other project by its config's zero-shot method, as before continuous learning. The
choice is read from SQLite on every request (one indexed query), so an ``ovss-label models
activate`` or ``deactivate`` in another process is seen by the next ``/setup`` or ``/predict``
with no restart. A version whose head file is gone is logged (once per version) and the project
falls back to zero-shot: a deleted folder never crashes a request.

Built proposers are kept by ``(method, head)``: two projects with different heads get
different proposers. Zero-shot ones (``head`` None, one per method) are kept for the process's
life. Head-specific ones are bounded (:data:`MAX_HEAD_PROPOSERS`, least recently used first
out): every promotion brings a new head, so without a bound a long-running server would hold
every head it ever served. The backbone and text tower they share live once in the model pool,
so an evicted head's proposer is rebuilt by reading only its head file.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable

from ..learning.versions import Version, VersionStore
from ..learning.worker import TRAINED_METHOD
from ..proposers import Proposer

log = logging.getLogger(__name__)


MAX_HEAD_PROPOSERS = 4
"""Head-specific proposers kept built: a few projects' active heads at once (module docstring)."""

Choice = tuple[str, str | None]
"""``(method, head)``: the method to run and the head file it uses (None: its default)."""


def trained_method(config_method: str) -> str:
    """The method serving a trained version for a config whose method is ``config_method``."""
    return f"{TRAINED_METHOD}+sam" if config_method.endswith("+sam") else TRAINED_METHOD


def project_id(value: object) -> int | None:
    """A Label Studio project id from ``"<id>.<timestamp>"`` (what ``/setup`` and ``/predict``
    send), an int or a digit string; None for anything else (treated as no project)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str):
        head = value.strip().partition(".")[0]
        return int(head) if head.isascii() and head.isdigit() else None
    return None


class Chooser:
    """The per-request choice of method and head (module docstring); thread-safe."""

    def __init__(self, versions: Callable[[], VersionStore]) -> None:
        """``versions`` gives the store (called per choice: the engine creates it lazily)."""
        self._versions = versions
        self._warned: set[tuple[int, str]] = set()

    def __call__(self, project: int | None, config_method: str) -> Choice:
        """``(fmbseg[+sam], head file)`` when ``project`` has a usable active version, else
        ``(config_method, None)``."""
        if project is None:
            return config_method, None
        try:
            store = self._versions()
            version = store.active(project)
        except (sqlite3.Error, OSError) as exc:  # locked, damaged, unwritable: zero-shot, said
            log.warning("project %d: versions unreadable, serving zero-shot: %s", project, exc)
            return config_method, None
        if version is None:
            return config_method, None
        head = store.head_path(version)
        if not head.is_file():
            self._missing(version, str(head))
            return config_method, None
        return trained_method(config_method), str(head)

    def _missing(self, version: Version, head: str) -> None:
        """Logs, once per version, that its head file is gone."""
        key = (version.project, version.name)
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "project %d: active version %s has no head file at %s; serving the zero-shot"
                " method (`ovss-label models activate` another version or retrain)",
                version.project, version.name, head,
            )  # fmt: skip


class ProposerCache:
    """Built proposers by ``(method, head)``, one build per key at a time (module docstring)."""

    def __init__(self, max_heads: int = MAX_HEAD_PROPOSERS) -> None:
        self.max_heads = max_heads
        self._zero_shot: dict[Choice, Proposer] = {}
        self._heads: OrderedDict[Choice, Proposer] = OrderedDict()
        self._building: dict[Choice, threading.Lock] = {}
        self._lock = threading.Lock()

    def peek(self, key: Choice) -> Proposer | None:
        """The built proposer, if any; takes no lock (never waits behind a build)."""
        found = self._zero_shot.get(key)
        return found if found is not None else self._heads.get(key)

    def get(self, key: Choice, build: Callable[[], Proposer]) -> Proposer:
        """The proposer of ``key``, built by ``build()`` if needed; other keys do not wait."""
        with self._lock:
            building = self._building.setdefault(key, threading.Lock())
        with building:
            with self._lock:
                found = self._take(key)
            if found is None:
                found = build()
                with self._lock:
                    self._keep(key, found)
            return found

    def _take(self, key: Choice) -> Proposer | None:
        if key in self._heads:
            self._heads.move_to_end(key)
            return self._heads[key]
        return self._zero_shot.get(key)

    def _keep(self, key: Choice, proposer: Proposer) -> None:
        if key[1] is None:
            self._zero_shot[key] = proposer
            return
        self._heads[key] = proposer
        while len(self._heads) > self.max_heads:
            evicted, _ = self._heads.popitem(last=False)
            self._building.pop(evicted, None)
