"""COCO instance-segmentation files: a writer and a reader, on pycocotools.

Format contract (cocodataset.org "Data format", pycocotools ``mask.py``)
========================================================================
- ``images``: ``{"id", "file_name", "width", "height"}``; ids are positive ints.
- ``categories``: ``{"id", "name", "supercategory"}``; ids 1..K in vocabulary order (ontology
  or Label Studio label-config order), so they are stable across exports of one project.
- ``annotations``: ``{"id", "image_id", "category_id", "segmentation", "area", "bbox",
  "iscrowd": 0}`` (+ ``"score"`` when the source had one).
  - ``segmentation`` is either polygons ``[[x1, y1, x2, y2, ...], ...]`` (rings are unioned, so
    holes cannot be expressed; coordinates in the pixel-edge frame of ``polygons``) or
    compressed RLE ``{"size": [H, W], "counts": str}`` (column-major runs, exact, holes kept).
  - ``bbox`` is ``[x, y, w, h]`` in pixels, ``area`` the pixel count, both of the
    segmentation as pycocotools decodes it (what COCOeval compares).
- Segmentation modes: ``polygon`` (always polygons; holes are filled, which the writer counts),
  ``rle`` (always RLE), ``auto`` (polygons unless the mask has holes or its polygons would not
  reproduce it: IoU < ``min_polygon_iou``). An instance that came from vector data (a Label
  Studio polygon or rectangle) keeps its own vertices as polygons.
- ``export_tasks_to_coco`` / ``CocoTaskWriter``: Label Studio tasks (``ls_tasks``) to COCO.
  Images keep ``ls_task_id`` (when the task has an id) and ``ls_image_url``, which
  ``import --coco`` uses to point new tasks back to the same images.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pycocotools import mask as coco_mask

from .instance import Instance
from .ls_regions import Prefer
from .ls_tasks import ExportReport, ImageSizeLookup, Skipped, TaskImage, TaskSource, export_images
from .polygons import mask_to_polygons, polygons_to_mask, ring_to_flat

__all__ = [
    "SEGMENTATION_MODES",
    "CocoError",
    "CocoImage",
    "CocoTaskWriter",
    "CocoWriter",
    "annotation_to_instance",
    "export_tasks_to_coco",
    "polygon_rings",
    "read_coco",
    "write_bytes_atomic",
    "write_json_atomic",
]

SegmentationMode = Literal["polygon", "rle", "auto"]
SEGMENTATION_MODES: tuple[str, ...] = ("polygon", "rle", "auto")


class CocoError(ValueError):
    """A COCO file or annotation that cannot be read; the message names the record."""


@dataclass
class CocoImage:
    """One image of a COCO file with its instances (reader output)."""

    id: int
    file_name: str
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class CocoWriter:
    """Builds a COCO dict from images and instances.

    Args:
        categories: category names in vocabulary order; ids are 1..K in this order. Labels met
            later that are not in it are appended (``extra_categories`` lists them).
        segmentation: ``polygon``, ``rle`` or ``auto`` (see the module docstring).
        tolerance_px: polygon simplification tolerance (``mask_to_polygons``).
        min_polygon_iou: in ``auto``, masks whose polygons fall below this IoU are written as RLE.

    ``info`` is the file's ``info`` record; a writer of predictions adds its ``model_version``
    there, so a COCO file says which model made it.
    """

    def __init__(
        self,
        categories: Sequence[str],
        *,
        segmentation: SegmentationMode = "auto",
        tolerance_px: float = 1.0,
        min_polygon_iou: float = 0.98,
    ) -> None:
        if segmentation not in SEGMENTATION_MODES:
            raise ValueError(
                f"segmentation must be one of {SEGMENTATION_MODES}, got {segmentation!r}"
            )
        self.segmentation = segmentation
        self.tolerance_px = tolerance_px
        self.min_polygon_iou = min_polygon_iou
        self._category_ids: dict[str, int] = {}
        self.extra_categories: list[str] = []
        for name in categories:
            self._category_ids.setdefault(name, len(self._category_ids) + 1)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.holes_filled = 0  # masks with holes written as polygons (segmentation="polygon")
        self.info: dict[str, Any] = {"description": "exported by ovss-label"}

    def category_id(self, label: str) -> int:
        if label not in self._category_ids:
            self._category_ids[label] = len(self._category_ids) + 1
            self.extra_categories.append(label)
        return self._category_ids[label]

    def add_image(self, file_name: str, width: int, height: int, **extra: Any) -> int:
        """Adds an image and returns its id (1, 2, ... in insertion order)."""
        image_id = len(self.images) + 1
        self.images.append(
            {"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)}
            | extra
        )
        return image_id

    def add_instance(self, image_id: int, instance: Instance) -> dict[str, Any] | None:
        """Adds one annotation; returns it, or None when the instance's mask is empty."""
        segmentation = self._segmentation(instance)
        rle = _as_rle(segmentation, instance.height, instance.width)
        area = int(coco_mask.area(rle))
        if area == 0:
            return None
        annotation: dict[str, Any] = {
            "id": len(self.annotations) + 1,
            "image_id": image_id,
            "category_id": self.category_id(instance.label),
            "segmentation": segmentation,
            "area": area,
            "bbox": [float(v) for v in coco_mask.toBbox(rle)],
            "iscrowd": 0,
        }
        if instance.score is not None:
            annotation["score"] = float(instance.score)
        self.annotations.append(annotation)
        return annotation

    def _segmentation(self, instance: Instance) -> list[list[float]] | dict[str, Any]:
        rings = polygon_rings(instance, self.segmentation, self.tolerance_px, self.min_polygon_iou)
        if rings is None:
            return _rle_json(instance.mask)
        if self.segmentation == "polygon" and instance.polygons is None:
            self.holes_filled += int(instance.has_holes())
        return [ring_to_flat(r) for r in rings]

    def to_dict(self) -> dict[str, Any]:
        categories = [
            {"id": cid, "name": name, "supercategory": ""}
            for name, cid in sorted(self._category_ids.items(), key=lambda kv: kv[1])
        ]
        return {
            "info": dict(self.info),
            "licenses": [],
            "images": self.images,
            "categories": categories,
            "annotations": self.annotations,
        }


def _rle_json(mask: NDArray[Any]) -> dict[str, Any]:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def polygon_rings(
    instance: Instance,
    segmentation: SegmentationMode = "auto",
    tolerance_px: float = 1.0,
    min_polygon_iou: float = 0.98,
) -> list[NDArray[Any]] | None:
    """The rings to write for an instance in a segmentation mode, or None for a raster (RLE).

    Vector sources keep their own vertices; masks are traced with ``mask_to_polygons`` and
    give one exterior ring per part (holes are not kept). ``auto`` returns None for masks with
    holes and masks whose rings, rasterised, overlap them by less than ``min_polygon_iou``.

    Returns:
        (N, 2) xy rings in the pixel-edge frame, or None.
    """
    if segmentation == "rle":
        return None
    if instance.polygons is not None:
        return [np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in instance.polygons]
    if segmentation == "auto" and instance.has_holes():
        return None
    polygons = mask_to_polygons(instance.mask, tolerance_px)
    rings = [np.asarray(p.exterior.coords)[:-1] for p in polygons]
    if segmentation == "polygon":
        return rings
    drawn = polygons_to_mask(rings, instance.height, instance.width)
    return rings if _iou(drawn, instance.mask) >= min_polygon_iou else None


def _as_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A compressed RLE (pycocotools form) of any COCO segmentation."""
    if isinstance(segmentation, list):
        rings = [r for r in segmentation if len(r) >= 6]
        if not rings:
            empty: dict[str, Any] = coco_mask.encode(np.zeros((height, width), np.uint8, order="F"))
            return empty
        merged: dict[str, Any] = coco_mask.merge(coco_mask.frPyObjects(rings, height, width))
        return merged
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        compressed: dict[str, Any] = coco_mask.frPyObjects(segmentation, height, width)
        return compressed  # from uncompressed RLE
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        return {"size": segmentation["size"], "counts": segmentation["counts"].encode("ascii")}
    raise CocoError(f"unsupported segmentation of type {type(segmentation).__name__}")


def _iou(a: NDArray[Any], b: NDArray[Any]) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def annotation_to_instance(
    annotation: dict[str, Any], height: int, width: int, label: str
) -> Instance:
    """One COCO annotation to an ``Instance`` (polygons, RLE, or a bare ``bbox``).

    Raises:
        CocoError: the segmentation cannot be decoded at this image size.
    """
    score = annotation.get("score")
    segmentation = annotation.get("segmentation")
    try:
        if isinstance(segmentation, list) and segmentation:
            rings = tuple(np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in segmentation)
            mask = polygons_to_mask(rings, height, width)
            return Instance(mask, label, score, polygons=rings, kind="polygon")
        if isinstance(segmentation, dict):
            if list(segmentation.get("size", [])) != [height, width]:
                raise CocoError(
                    f"annotation {annotation.get('id')}: RLE size {segmentation.get('size')} "
                    f"!= image {[height, width]}"
                )
            mask = coco_mask.decode(_as_rle(segmentation, height, width)).astype(bool)
            return Instance(mask, label, score)
        x, y, w, h = (float(v) for v in annotation["bbox"])
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CocoError):
            raise
        raise CocoError(f"annotation {annotation.get('id')}: {err}") from err
    corners = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
    mask = polygons_to_mask([corners], height, width)
    return Instance(mask, label, score, polygons=(corners,), kind="box")


def read_coco(source: str | os.PathLike[str] | dict[str, Any]) -> tuple[list[str], list[CocoImage]]:
    """Reads a COCO instance file.

    Args:
        source: a path to the JSON file, or the already-parsed dict.

    Returns:
        Category names ordered by id, and the images in file order with their instances.

    Raises:
        CocoError: the file is not COCO, or an annotation references a missing image/category
            or cannot be decoded (the message names the annotation id).
    """
    data = _load(source)
    try:
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {
            int(im["id"]): CocoImage(
                int(im["id"]),
                str(im["file_name"]),
                int(im["width"]),
                int(im["height"]),
                extra={
                    k: v for k, v in im.items() if k not in ("id", "file_name", "width", "height")
                },
            )
            for im in data["images"]
        }
    except (KeyError, TypeError, ValueError) as err:
        raise CocoError(f"not a COCO instances file: missing or bad field {err}") from err
    annotations = data.get("annotations") or []
    if not isinstance(annotations, list):
        raise CocoError("not a COCO instances file: annotations is not a list")
    for position, ann in enumerate(annotations, 1):
        if not isinstance(ann, dict):
            raise CocoError(f"annotation #{position} is not an object ({type(ann).__name__})")
        image = images.get(_id(ann.get("image_id")))
        label = categories.get(_id(ann.get("category_id")))
        if image is None or label is None:
            raise CocoError(f"annotation {ann.get('id')} references a missing image or category")
        image.instances.append(annotation_to_instance(ann, image.height, image.width, label))
    return [categories[k] for k in sorted(categories)], list(images.values())


def _id(value: Any) -> int:
    """A COCO id as an int (``7`` or ``"7"``); -1 (no record has it) for anything else (null,
    ``"a"``, lists)."""
    if isinstance(value, bool):
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _load(source: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    try:
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoError(f"{source}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CocoError(f"{source}: a COCO file is a JSON object, got {type(data).__name__}")
    return data


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> None:
    """Writes JSON whole or not at all (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(obj, indent=indent).encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Writes ``data`` to a temp file next to ``path``, flushes it to disk (``fsync``) and
    renames it: after a crash or a ``kill -9`` the file is the old one or the new one, never a
    half-written one.

    The file gets the mode ``open()`` would give: an existing file keeps its mode, a new one
    0o666 less the umask (the temp file is created 0600 and the rename would keep that).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back; commands write
    # their outputs from one thread, after the work is done, so nothing else sees the 0.
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CocoTaskWriter:
    """``ls_tasks.ImageWriter`` for COCO; ``path``, if given, is written on ``close``."""

    name = "COCO"

    def __init__(
        self,
        categories: Sequence[str],
        *,
        segmentation: SegmentationMode = "auto",
        tolerance_px: float = 1.0,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.coco = CocoWriter(categories, segmentation=segmentation, tolerance_px=tolerance_px)
        self.path = path

    @property
    def holes_filled(self) -> int:
        return self.coco.holes_filled

    def add(self, image: TaskImage, report: ExportReport) -> None:
        # Keep the task id and URL: `import --coco` points new tasks back to the same images.
        extra = {"ls_task_id": image.task_id} if image.task_id is not None else {}
        image_id = self.coco.add_image(
            image.file_name, image.width, image.height, **extra, ls_image_url=image.url
        )
        for region, inst in image.regions:
            if self.coco.add_instance(image_id, inst) is None:  # polygons drawing no pixel
                reason = "empty region (no pixels)"
                report.skipped.append(Skipped(image.task_id, region, reason, image.task))

    def close(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.coco.to_dict())


def export_tasks_to_coco(
    tasks: Iterable[dict[str, Any]],
    *,
    categories: Sequence[str] | None = None,
    segmentation: SegmentationMode = "auto",
    include_predictions: bool = False,
    data_key: str | None = None,
    image_size: ImageSizeLookup | None = None,
    tolerance_px: float = 1.0,
    prefer: Prefer = "brush",
) -> tuple[dict[str, Any], ExportReport]:
    """Converts Label Studio tasks to a COCO instances dict.

    Args:
        tasks: the tasks of a Label Studio JSON export.
        categories: category order (label-config or ontology order); None sorts the labels met.
        segmentation: ``polygon``, ``rle`` or ``auto`` (see the module docstring).
        tolerance_px: polygon simplification tolerance in pixels.
        include_predictions, data_key, image_size, prefer: see ``TaskSource``.

    Returns:
        The COCO dict and the report. A bad region is skipped and reported with its task; the
        rest of the task is exported.
    """
    source = TaskSource(
        tasks,
        include_predictions=include_predictions,
        data_key=data_key,
        image_size=image_size,
        prefer=prefer,
    )
    names = categories if categories is not None else source.labels()
    writer = CocoTaskWriter(names, segmentation=segmentation, tolerance_px=tolerance_px)
    report = export_images(source, [writer], categories)
    return writer.coco.to_dict(), report
