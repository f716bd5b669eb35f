"""Label Studio tasks (a JSON export) to COCO, with a report of everything that was skipped.

Format contract (Label Studio "JSON" export, 1.20-1.23)
======================================================
A list of tasks: ``{"id", "data": {<key>: <image url>}, "annotations": [...],
"predictions": [...]}``. An annotation: ``{"id", "result": [...], "was_cancelled",
"created_at", "updated_at"}``; a prediction: ``{"id", "result", "score", "model_version",
"created_at"}``. Result items: see ``labelstudio``. The "JSON-MIN" export flattens this and
is rejected with a message that says so.

Choice of record per task: the latest (``updated_at``, then ``created_at``, then ``id``)
annotation that was not cancelled (skipped), even when its result is empty (the person said
"nothing here": the image goes into COCO without annotations). With ``include_predictions``,
a task without such an annotation falls back to its latest prediction. Tasks with neither are
counted, not exported.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from .coco import CocoWriter, SegmentationMode
from .instance import Instance
from .labelstudio import REGION_TYPES, RegionError, result_to_instance

__all__ = [
    "ExportReport",
    "Skipped",
    "export_tasks_to_coco",
    "file_name",
    "image_url",
    "pick_record",
]

ImageSizeLookup = Callable[[dict[str, Any], str], tuple[int, int] | None]
"""(task, image url) -> (width, height) of the image, or None when unknown."""


@dataclass
class Skipped:
    """A record left out of the export, and why."""

    task_id: Any
    region_id: str | None
    reason: str


@dataclass
class ExportReport:
    """What an export did: counts for the summary table and every skipped record."""

    tasks: int = 0
    images: int = 0
    from_predictions: int = 0
    unlabelled: int = 0
    per_category: Counter[str] = field(default_factory=Counter)
    skipped: list[Skipped] = field(default_factory=list)
    other_results: Counter[str] = field(default_factory=Counter)
    holes_filled: int = 0
    extra_categories: list[str] = field(default_factory=list)


def export_tasks_to_coco(
    tasks: Iterable[dict[str, Any]],
    *,
    categories: Sequence[str] | None = None,
    segmentation: SegmentationMode = "auto",
    include_predictions: bool = False,
    data_key: str | None = None,
    image_size: ImageSizeLookup | None = None,
    tolerance_px: float = 1.0,
) -> tuple[dict[str, Any], ExportReport]:
    """Converts Label Studio tasks to a COCO instances dict.

    Args:
        tasks: the tasks of a Label Studio JSON export.
        categories: category order (label-config or ontology order); None sorts the labels met.
        segmentation: ``polygon``, ``rle`` or ``auto`` (see ``coco``).
        include_predictions: use a task's latest prediction when it has no annotation.
        data_key: the task data field holding the image (the ``<Image value="$key">``); None
            takes ``image``, else the only string field.
        image_size: fallback for tasks whose regions carry no size (e.g. an empty annotation),
            such as reading the image file's header.
        tolerance_px: polygon simplification tolerance in pixels.

    Returns:
        The COCO dict and the report. A bad region is skipped and reported with its task id;
        the rest of the task is exported.
    """
    report = ExportReport()
    chosen = []
    for task in tasks:
        report.tasks += 1
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise ValueError(_not_a_task_message(task))
        record, source = pick_record(task, include_predictions)
        if record is None:
            report.unlabelled += 1
            continue
        report.from_predictions += source == "prediction"
        chosen.append((task, record))

    # Masks are decoded one task at a time (a project's masks need not fit in memory together).
    writer = CocoWriter(
        categories if categories is not None else _labels(r for _, r in chosen),
        segmentation=segmentation,
        tolerance_px=tolerance_px,
    )
    for task, record in chosen:
        regions = _convert(task, record, report)
        _add_task(writer, task, regions, data_key, image_size, report)
    report.holes_filled = writer.holes_filled
    report.extra_categories = list(writer.extra_categories) if categories is not None else []
    return writer.to_dict(), report


def pick_record(
    task: dict[str, Any], include_predictions: bool = False
) -> tuple[dict[str, Any] | None, str]:
    """The annotation or prediction to export for a task, and ``"annotation"``/``"prediction"``."""
    annotations = [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    if annotations:
        return max(annotations, key=_recency), "annotation"
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    if include_predictions and predictions:
        return max(predictions, key=_recency), "prediction"
    return None, ""


def _labels(records: Iterable[dict[str, Any]]) -> list[str]:
    """Sorted labels of the region results of records, read without decoding any mask."""
    labels = set()
    for record in records:
        for result in record.get("result") or []:
            kind = str(result.get("type", "")).lower() if isinstance(result, dict) else ""
            names = (result.get("value") or {}).get(kind) if kind in REGION_TYPES else None
            if names:
                labels.add(str(names[0]))
    return sorted(labels)


def _recency(record: dict[str, Any]) -> tuple[float, float, int]:
    ident = record.get("id")
    return (
        _timestamp(record.get("updated_at")),
        _timestamp(record.get("created_at")),
        ident if isinstance(ident, int) else -1,
    )


def _timestamp(value: Any) -> float:
    if not isinstance(value, str):
        return float("-inf")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


Region = tuple[str | None, Instance]
"""(Label Studio region id, instance)."""


def _convert(task: dict[str, Any], record: dict[str, Any], report: ExportReport) -> list[Region]:
    regions: list[Region] = []
    for result in record.get("result") or []:
        if not isinstance(result, dict):
            continue
        kind = str(result.get("type", "")).lower()
        if kind not in REGION_TYPES:
            report.other_results[kind or "untyped"] += 1
            continue
        try:
            instance = result_to_instance(result)
        except RegionError as err:
            report.skipped.append(Skipped(task.get("id"), err.region_id, str(err)))
            continue
        if instance is not None:
            regions.append((result.get("id"), instance))
    return regions


def _add_task(
    writer: CocoWriter,
    task: dict[str, Any],
    regions: list[Region],
    data_key: str | None,
    image_size: ImageSizeLookup | None,
    report: ExportReport,
) -> None:
    task_id = task.get("id")
    try:
        url = image_url(task, data_key)
    except ValueError as err:
        report.skipped.append(Skipped(task_id, None, str(err)))
        return
    size = _task_size(task, [inst for _, inst in regions]) or (
        image_size(task, url) if image_size else None
    )
    if size is None:
        reason = "image size unknown: no region carries original_width/height"
        hint = "; pass --image-dir" if image_size is None else "; image file not found"
        report.skipped.append(Skipped(task_id, None, reason + hint))
        return
    width, height = size
    image_id = writer.add_image(file_name(url), width, height, ls_task_id=task_id, ls_image_url=url)
    report.images += 1
    for region, inst in regions:
        if (inst.width, inst.height) != (width, height):
            reason = f"region size {inst.width}x{inst.height} differs from image {width}x{height}"
            report.skipped.append(Skipped(task_id, region, reason))
        elif writer.add_instance(image_id, inst) is None:
            report.skipped.append(Skipped(task_id, region, "empty region (no pixels)"))
        else:
            report.per_category[inst.label] += 1


def _task_size(task: dict[str, Any], instances: list[Instance]) -> tuple[int, int] | None:
    """(width, height): from the first region, else from any result of the task with a size."""
    if instances:
        return instances[0].width, instances[0].height
    for record in (task.get("annotations") or []) + (task.get("predictions") or []):
        for result in (record or {}).get("result") or []:
            w, h = result.get("original_width"), result.get("original_height")
            if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
                return w, h
    return None


def image_url(task: dict[str, Any], data_key: str | None = None) -> str:
    """The image URL or path of a task (``data[data_key]``; see ``export_tasks_to_coco``)."""
    data = task["data"]
    if data_key is not None:
        if data_key not in data:
            raise ValueError(f"task {task.get('id')} has no data field {data_key!r}")
        return str(data[data_key])
    if "image" in data:
        return str(data["image"])
    strings = [v for v in data.values() if isinstance(v, str)]
    if len(strings) != 1:
        raise ValueError(
            f"task {task.get('id')}: cannot tell which data field is the image "
            f"({sorted(data)}); pass the label config or the data key"
        )
    return strings[0]


def file_name(url: str) -> str:
    """COCO ``file_name`` of a Label Studio image URL: the base name of the stored file."""
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d")  # /data/local-files/?d=relative/path.jpg
    path = local[0] if local else parsed.path
    return posixpath.basename(unquote(path)) or url


def _not_a_task_message(task: Any) -> str:
    if isinstance(task, dict) and "image" in task and "data" not in task:
        return "this looks like a JSON-MIN export; export the project as JSON instead"
    return f"not a Label Studio task (no 'data' object): {str(task)[:80]}"
