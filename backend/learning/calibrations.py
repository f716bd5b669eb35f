"""Per-project calibration of the zero-shot method: scores that mean something before any
version is trained.

A trained version's ``calibration.json`` sits beside its head (``worker.py``). A project with
no active version is served by its zero-shot method, whose raw scores rank images but are not
frequencies (``proposers/confidence.py``). Every training job scores that method on the
project's held-out annotations anyway (the gate's baseline), so it fits the same
confidence-to-accuracy map from that histogram and saves it here, per project and per
method, whether or not the candidate is promoted:

    <data_dir>/calibration/<project>/<method>.json
    {"format": "ovss-calibration/1", "knots", "accuracy", "pixels", "images",
     "model_version": "<the method's identity it was measured on>", "job": <job id>}

It applies only to predictions of that same ``model_version`` (other weights are another
model: a stale map is ignored, not misapplied), and to the ``+sam`` variant of the method
too, whose score is the dense method's confidence (``proposers/refine.py``). Each job replaces
the project's map: its held-out tasks are the latest annotations of a sticky split
(``split.py``), so the newest snapshot holds the previous one's held-out tasks and any new.

Readers (:class:`ZeroShotCalibrations`) re-read a file only when it changed (one ``stat`` per
prediction), and a damaged file is logged once and ignored: a score never fails a prediction.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

from ovss_label.converters import write_json_atomic

from ..evaluation.calibration import Reliability
from ..proposers.confidence import Calibration

log = logging.getLogger(__name__)

FOLDER = "calibration"
_METHOD = re.compile(r"[a-z0-9_]+")
"""A dense method's name (``naclip``, ``pnp``, ``clip_sam``): safe as a file name."""


def dense_method(method: str) -> str:
    """The method whose confidence a prediction of ``method`` reports: ``naclip+sam`` →
    ``naclip`` (module docstring)."""
    return method.removesuffix("+sam")


def zero_shot_path(data_dir: Path, project: int, method: str) -> Path:
    """``<data_dir>/calibration/<project>/<method>.json`` for a dense ``method``.

    Raises:
        ValueError: ``method`` is not a plain method name (it becomes a file name).
    """
    if not _METHOD.fullmatch(method):
        raise ValueError(f"not a dense method name: {method!r}")
    return data_dir / FOLDER / str(int(project)) / f"{method}.json"


def write_zero_shot(
    data_dir: Path,
    project: int,
    method: str,
    model_version: str,
    reliability: Reliability | None,
    job: int | None = None,
) -> Path | None:
    """Fits and saves the project's map for a dense ``method`` (module docstring); None
    when there were no labelled pixels (a saved map is then kept)."""
    if reliability is None or reliability.pixels.sum() == 0:
        return None
    path = zero_shot_path(data_dir, project, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {**reliability.fit().to_json(), "model_version": model_version, "job": job}
    write_json_atomic(path, content, indent=1)
    return path


def _read(path: Path) -> tuple[Calibration, str] | None:
    """The map and the ``model_version`` it was measured on; None when there is no file.

    Raises:
        ValueError: The file is not a zero-shot calibration (named).
    """
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        version = data["model_version"]
        if not isinstance(version, str):
            raise TypeError("model_version is not a string")
        return Calibration.from_json(data), version
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err


class ZeroShotCalibrations:
    """The saved maps of a data directory, re-read only when a file changes; thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._seen: dict[Path, tuple[tuple[int, int], tuple[Calibration, str] | None]] = {}
        self._lock = threading.Lock()

    def get(self, project: int, method: str, model_version: str) -> Calibration | None:
        """The map for ``project``'s dense ``method`` if one was measured on
        ``model_version``, else None (none saved, another model, a damaged file)."""
        try:
            path = zero_shot_path(self.data_dir, project, dense_method(method))
            stamp = path.stat()
        except (OSError, ValueError):
            return None
        key = (stamp.st_mtime_ns, stamp.st_size)
        with self._lock:
            seen = self._seen.get(path)
        if seen is None or seen[0] != key:
            seen = (key, self._load(path))
            with self._lock:
                self._seen[path] = seen
        found = seen[1]
        return found[0] if found is not None and found[1] == model_version else None

    def _load(self, path: Path) -> tuple[Calibration, str] | None:
        try:
            return _read(path)
        except (OSError, ValueError) as exc:  # once per file version: cached as None
            log.warning("zero-shot calibration ignored (raw scores used): %s", exc)
            return None
