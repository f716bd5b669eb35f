"""LabelMe 5.x JSON files (``export --labelme``) from exported Label Studio images.

Format contract (wkentaro/labelme ``LabelFile``, read alike by labelme 5.4 to 7.x)
=================================================================================
- One JSON file per image, ``<dir>/<file_name minus extension>.json``, where ``file_name`` is
  the image's relative path (``ls_tasks.image_path``). ``imagePath`` is the image's base name,
  which labelme resolves against the JSON file's folder: put the JSON files next to the images
  (copy the tree over the image root). ``imageData`` is null (not embedded); ``imageHeight``,
  ``imageWidth`` are the exported size; ``version`` is "5.5.0"; ``flags`` is ``{}``.
- ``shapes``: ``{"label", "points", "group_id", "description", "shape_type", "flags",
  "mask"}``, as labelme writes them; ``description`` holds the model score, if any.
  - ``polygon``: ``points`` ``[[x, y], ...]`` in pixels, pixel-edge frame (as COCO: labelme's
    canvas draws pixel (r, c) over [c, c+1) x [r, r+1)); ``mask`` null.
  - ``mask`` (exact, holes kept; labelme >= 5.4.1): ``points`` ``[[x1, y1], [x2, y2]]``, the
    column and row of the first and last pixel of the bounding box (inclusive); ``mask`` a
    base64 PNG (8-bit grey, 0/1, as labelme writes it) of exactly (y2 - y1 + 1) rows and
    (x2 - x1 + 1) columns, which labelme pastes at ``[y1:y2 + 1, x1:x2 + 1]``.
- Which shape follows the COCO segmentation modes (``coco.polygon_rings``): ``auto`` writes
  polygons unless a mask has holes or its polygons would not reproduce it (IoU < 0.98), then a
  ``mask`` shape; ``rle`` writes every instance as a ``mask`` shape; ``polygon`` writes
  polygons only (a mask's holes filled, counted in ``holes_filled``). Label Studio polygons and
  rectangles keep their own vertices. Masks are traced with ``mask_to_polygons``.
- An instance of several parts is one polygon per part, all with the same ``group_id`` (labelme
  groups shapes of one label and ``group_id`` into one instance); otherwise ``group_id`` null.
"""

from __future__ import annotations

import base64
import io
import os
import posixpath
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from .coco import SegmentationMode, polygon_rings, write_json_atomic
from .instance import Instance
from .ls_tasks import ExportReport, TaskImage, first_task_of_image

__all__ = ["LABELME_VERSION", "LabelmeWriter", "instance_shapes", "labelme_document"]

LABELME_VERSION = "5.5.0"
"""Written as ``version``: a 5.x release that reads ``mask`` shapes."""


class LabelmeWriter:
    """``ls_tasks.ImageWriter`` for LabelMe JSON (see the module docstring).

    Args:
        out_dir: the folder the JSON files go to (created).
        segmentation: ``auto``, ``rle`` (``mask`` shapes) or ``polygon``.
        tolerance_px: polygon simplification tolerance for traced masks.
    """

    name = "LabelMe"

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        segmentation: SegmentationMode = "auto",
        tolerance_px: float = 1.0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.segmentation: SegmentationMode = segmentation
        self.tolerance_px = tolerance_px
        self.holes_filled = 0
        self._written: dict[str, str] = {}

    def json_path(self, image: TaskImage) -> Path:
        """``<out_dir>/<file_name without extension>.json``."""
        return self.out_dir / PurePosixPath(image.file_name).with_suffix(".json")

    def add(self, image: TaskImage, report: ExportReport) -> None:
        """Writes the image's JSON file (with no shapes when it has no instance)."""
        path = self.json_path(image)
        if not first_task_of_image(self._written, image, path, report):
            return
        shapes = []
        for number, (_, inst) in enumerate(image.regions, 1):
            polygon_only = self.segmentation == "polygon" and inst.polygons is None
            self.holes_filled += polygon_only and inst.has_holes()
            shapes += instance_shapes(inst, number, self.segmentation, self.tolerance_px)
        write_json_atomic(path, labelme_document(image, shapes), indent=2)

    def close(self) -> None:
        """Nothing to finish: every file is complete when written."""


def labelme_document(image: TaskImage, shapes: list[dict[str, Any]]) -> dict[str, Any]:
    """A LabelMe file's content, keys in labelme's own order."""
    return {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": posixpath.basename(image.file_name),
        "imageData": None,
        "imageHeight": image.height,
        "imageWidth": image.width,
    }


def instance_shapes(
    instance: Instance,
    group_id: int,
    segmentation: SegmentationMode = "auto",
    tolerance_px: float = 1.0,
) -> list[dict[str, Any]]:
    """The LabelMe shapes of one instance: a ``mask``, or one ``polygon`` per part.

    Args:
        instance: the object.
        group_id: written when the instance needs several shapes (labelme's grouping).
        segmentation: see the module docstring.
        tolerance_px: polygon simplification tolerance for traced masks.
    """
    rings = polygon_rings(instance, segmentation, tolerance_px)
    if rings is None:
        return [_mask_shape(instance)]
    rings = [r for r in rings if len(r) >= 3]
    group = group_id if len(rings) > 1 else None
    return [_shape(instance, "polygon", np.round(r, 3).tolist(), group) for r in rings]


def _mask_shape(instance: Instance) -> dict[str, Any]:
    rows, cols = np.nonzero(instance.mask)
    y1, y2, x1, x2 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
    crop = instance.mask[y1 : y2 + 1, x1 : x2 + 1].astype(np.uint8)  # 0/1, as labelme saves
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="PNG")  # 2-D uint8: 8-bit grey
    shape = _shape(instance, "mask", [[float(x1), float(y1)], [float(x2), float(y2)]], None)
    shape["mask"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return shape


def _shape(
    instance: Instance, shape_type: str, points: list[list[float]], group_id: int | None
) -> dict[str, Any]:
    score = "" if instance.score is None else f"score {instance.score:.4f}"
    return {
        "label": instance.label,
        "points": points,
        "group_id": group_id,
        "description": score,
        "shape_type": shape_type,
        "flags": {},
        "mask": None,
    }
