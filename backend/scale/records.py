"""Per-image records of ``predict --ray`` over files: what makes the run resumable.

Layout, beside the output file ``OUT``::

    OUT.parts/<run key>/<image key>.json

- the run key (16 hex) hashes what every image's outputs depend on besides the image
  (``predict.ImageOutputs``: model version, vocabulary, result targets, post-processing, COCO
  options, overlay folder): another model or threshold is another folder, never a stale record;
- the image key (24 hex) hashes the image's path, size and mtime, its task URL, COCO name and
  overlay name: an edited image, or another document root, is a new record;
- a record is ``{"format", "result"}`` with the image's ``predict.ImageResult``, written
  atomically (``write_bytes_atomic``: temp file, fsync, rename) after the image's overlay, so
  a record that exists is whole and its overlay written; a kill leaves at most temp files
  (``.*.tmp``), which are not records. A failure that may pass (a model or memory error) gets
  no record: a rerun tries the image again.

The final files are assembled from the records in input order (``predict.collect``), so they
are byte for byte those of a single-process run. Records stay after the run: a rerun over the
same images, or over a folder with new images, computes only what has no record. Deleting the
folder reclaims its space and costs only a full recomputation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ovss_label.converters import write_bytes_atomic

from ..predict import ImageOutputs, ImageResult

FORMAT = "ovss-predict-record/1"
SUFFIX = ".json"


def work_folder(output: Path) -> Path:
    """The records folder of an output file (``OUT.parts``)."""
    return output.with_name(output.name + ".parts")


class Records:
    """The records of one run's settings (module docstring).

    Args:
        output: The run's output file (tasks JSON).
        outputs: What each image writes; its ``repr`` is hashed into the run key (a frozen
            dataclass of plain values: the same in every process).
    """

    def __init__(self, output: Path, outputs: ImageOutputs) -> None:
        run = hashlib.sha256(repr(outputs).encode()).hexdigest()[:16]
        self.root = work_folder(output) / run

    @staticmethod
    def key(path: Path, url: str, name: str, overlay: str) -> str:
        """The image key of ``path`` (module docstring); stats the file (a missing file
        gets a key of its own, and then a failure record)."""
        try:
            stat = path.stat()
            state = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            state = "missing"
        text = "\0".join((str(path), state, url, name, overlay))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def path(self, key: str) -> Path:
        """The record file of ``key``."""
        return self.root / f"{key}{SUFFIX}"

    def finished(self) -> set[str]:
        """Keys that have a record (one directory listing)."""
        if not self.root.is_dir():
            return set()
        return {p.stem for p in self.root.iterdir() if p.suffix == SUFFIX and p.name[0] != "."}

    def write(self, key: str, result: ImageResult) -> None:
        """Stores ``result`` under ``key``, whole or not at all."""
        data = {"format": FORMAT, "result": _as_json(result)}
        write_bytes_atomic(self.path(key), json.dumps(data).encode())

    def read(self, key: str) -> ImageResult:
        """The result stored under ``key``.

        Raises:
            ValueError: No readable record (the message names the file to delete).
        """
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return _from_json(data["result"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable record ({exc}); delete it and rerun") from exc


def _as_json(result: ImageResult) -> dict[str, Any]:
    return {
        "path": result.path,
        "reason": result.reason,
        "task": result.task,
        "name": result.name,
        "size": list(result.size),
        "instances": result.instances,
        "annotations": [[label, annotation] for label, annotation in result.annotations],
        "holes_filled": result.holes_filled,
    }


def _from_json(data: dict[str, Any]) -> ImageResult:
    width, height = data["size"]
    annotations = tuple((str(label), dict(ann)) for label, ann in data["annotations"])
    return ImageResult(str(data["path"]), str(data["reason"]), data["task"], str(data["name"]),
                       (int(width), int(height)), int(data["instances"]), annotations,
                       int(data["holes_filled"]))  # fmt: skip
