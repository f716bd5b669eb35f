"""Ultralytics YOLO segmentation labels (``export --yolo``) from exported Label Studio images.

Format contract (docs.ultralytics.com/datasets/segment/, Ultralytics 8.x)
=========================================================================
- Layout: ``<dir>/data.yaml`` and one ``<dir>/labels/<file_name minus extension>.txt`` per
  image, where ``file_name`` is the image's relative path (``ls_tasks.image_path``, e.g.
  ``photos/chelsea.jpg`` -> ``labels/photos/chelsea.txt``). Ultralytics finds an image's labels
  by swapping ``/images/`` for ``/labels/`` and the extension for ``.txt``, so the images go to
  ``<dir>/images/<file_name>`` (not copied here). An image without instances gets an empty file
  (a background image, which Ultralytics trains on as such).
- One line per polygon: ``<class> x1 y1 x2 y2 ...``. ``class`` is the 0-based index of the label
  in ``data.yaml``'s ``names``; coordinates are pixel-edge-frame vertices (``polygons``: pixel
  (r, c) covers [c, c+1) x [r, r+1)) divided by the image width and height, so they lie in
  [0, 1], written with 6 decimals; at least 3 points.
- YOLO has neither holes nor multi-part objects: a mask is traced with ``mask_to_polygons`` and
  each part becomes its own line (one YOLO object per part, same class), outer ring only; a
  mask with holes is written with its holes filled (counted in ``holes_filled``). Label Studio
  polygons and rectangles keep their own vertices.
- ``data.yaml``: ``names`` as ``{0: first, 1: ...}`` in category order (label config, ontology,
  or the labels met, sorted), labels met outside it appended; ``nc``; ``train`` and ``val`` are
  ``images`` (no ``path`` key: Ultralytics then takes the folder holding ``data.yaml`` as the
  dataset root). Split the images into train/val folders yourself if you need a split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml
from numpy.typing import NDArray

from .coco import polygon_rings
from .instance import Instance
from .ls_tasks import ExportReport, TaskImage, first_task_of_image

__all__ = ["YoloWriter", "yolo_lines"]

_DECIMALS = 6


class YoloWriter:
    """``ls_tasks.ImageWriter`` for Ultralytics YOLO segmentation (see the module docstring).

    Args:
        out_dir: the dataset folder (created).
        categories: class names in vocabulary order; ids are 0..K-1 in this order. Labels met
            later are appended.
        tolerance_px: polygon simplification tolerance for traced masks (``mask_to_polygons``).
    """

    name = "YOLO"

    def __init__(
        self, out_dir: str | os.PathLike[str], categories: Sequence[str], tolerance_px: float = 1.0
    ) -> None:
        self.out_dir = Path(out_dir)
        self.tolerance_px = tolerance_px
        self.names: list[str] = list(dict.fromkeys(categories))  # order kept, repeats dropped
        self.holes_filled = 0
        self._written: dict[str, str] = {}

    def class_id(self, label: str) -> int:
        """The 0-based class of a label; a new label is appended to ``names``."""
        if label not in self.names:
            self.names.append(label)
        return self.names.index(label)

    def label_path(self, image: TaskImage) -> Path:
        """``<out_dir>/labels/<file_name without extension>.txt``."""
        relative = PurePosixPath(image.file_name).with_suffix(".txt")
        return self.out_dir / "labels" / relative

    def add(self, image: TaskImage, report: ExportReport) -> None:
        """Writes the image's label file (empty when it has no instance)."""
        path = self.label_path(image)
        if not first_task_of_image(self._written, image, path, report):
            return
        lines = []
        for _, inst in image.regions:
            self.holes_filled += inst.polygons is None and inst.has_holes()
            lines += yolo_lines(inst, self.class_id(inst.label), self.tolerance_px)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def close(self) -> None:
        """Writes ``data.yaml`` with the final class list."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "train": "images",
            "val": "images",
            "nc": len(self.names),
            "names": dict(enumerate(self.names)),
        }
        header = (
            "# Written by ovss-label export --yolo. Put each image at images/<its path>, next to\n"
            "# labels/<same path>.txt; split into train/val folders if you need a split.\n"
        )
        text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        (self.out_dir / "data.yaml").write_text(text, encoding="utf-8")


def yolo_lines(instance: Instance, class_id: int, tolerance_px: float = 1.0) -> list[str]:
    """One ``class x1 y1 ...`` line per outer ring of an instance (see the module docstring)."""
    rings = polygon_rings(instance, "polygon", tolerance_px) or []
    size = np.array([instance.width, instance.height], dtype=np.float64)
    return [_line(class_id, ring / size) for ring in rings if len(ring) >= 3]


def _line(class_id: int, xy: NDArray[Any]) -> str:
    coords = np.clip(np.round(xy, _DECIMALS), 0.0, 1.0).ravel()
    return " ".join([str(class_id), *(f"{v:.{_DECIMALS}f}" for v in coords)])
