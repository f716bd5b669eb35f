"""Label Studio tasks (a JSON export) to the images an export writes, with a skip report.

Format contract (Label Studio "JSON" export, 1.20-1.23)
======================================================
A list of tasks: ``{"id", "data": {<key>: <image url>}, "meta", "annotations": [...],
"predictions": [...]}``. An annotation: ``{"id", "result": [...], "was_cancelled",
"created_at", "updated_at"}``; a prediction: ``{"id", "result", "score", "model_version",
"created_at"}``. Result items: see ``labelstudio``. The "JSON-MIN" export flattens this and
is rejected with a message that says so. Tasks written by ``ovss-label predict`` have no
``id`` and carry ``meta = {"original_width": W, "original_height": H}``.

- Record per task: the latest (``updated_at``, then ``created_at``, then ``id``) annotation
  not cancelled (skipped), even with an empty result (the person said "nothing here": the
  image is exported without instances); with ``include_predictions``, else the latest
  prediction. Tasks with neither are counted, not exported.
- One instance per object: results that describe the same object (one region ``id``; our
  brush + polygon pairs) are merged, see ``ls_regions``.
- Image identity: ``file_name`` is the image's path (``image_path``): relative to the local
  files document root (``/data/local-files/?d=photos/a.jpg`` -> ``photos/a.jpg``), to Label
  Studio's media folder (``/data/upload/3/x-a.jpg`` -> ``upload/3/x-a.jpg``), the URL path
  without its leading slash (``http(s)``), or bucket and key (``s3://b/k.jpg`` -> ``b/k.jpg``).
  Different URLs that give one path are told apart by their host, else a ``-2``, ``-3``
  suffix; tasks of the same URL keep the same name.
- Image size (``width``, ``height``, EXIF orientation applied): from any result's
  ``original_width/height``, then ``task["meta"]``, then the ``image_size`` lookup (files).
- Labels, read without decoding a mask (``record_labels``): a region result's first name in
  ``value[<type>]``; per image (``labels_by_image``): the labels of its task's annotation.
- Reports name a task by its ``id``, else by its image, else by its position in the file.
"""

from __future__ import annotations

import itertools
import posixpath
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlparse

from ovss_label.ontologies import IMAGE_LABEL_TAGS

from .labelstudio import REGION_TYPES, RegionError, region_label, result_to_instance
from .ls_regions import PREFER_CHOICES, Prefer, Region, merge_same_instances

__all__ = [
    "ExportReport",
    "ImageWriter",
    "Skipped",
    "TaskImage",
    "TaskSource",
    "export_images",
    "file_name",
    "image_path",
    "image_url",
    "labels_by_image",
    "pick_record",
    "record_labels",
]

IMAGE_RESULT_TYPES = tuple(tag.lower() for tag in IMAGE_LABEL_TAGS)
"""Result types of the image-labelling controls (``brushlabels``, ..., ``keypointlabels``)."""

ImageSizeLookup = Callable[[dict[str, Any], str], tuple[int, int] | None]
"""(task, image url) -> (width, height) of the image, or None when unknown."""


@dataclass
class Skipped:
    """A record left out of the export, and why; ``task`` names the task in messages."""

    task_id: Any
    region_id: str | None
    reason: str
    task: str = ""


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
    merged: int = 0  # results folded into another result of the same object
    holes_filled: Counter[str] = field(default_factory=Counter)  # per output format
    extra_categories: list[str] = field(default_factory=list)


@dataclass
class TaskImage:
    """One image to export: its task, identity and size, and one instance per object.

    Attributes:
        task: how reports name it: ``task 12``, ``image photos/a.jpg``, ``task #3 in the file``.
        task_id: the Label Studio task id; None for ``predict`` output.
        url: the image URL as the task holds it.
        file_name: the image's distinct relative path (``image_path``).
        width: image width in pixels.
        height: image height in pixels.
        regions: (region id, instance); every mask is (height, width) and not empty.
    """

    task: str
    task_id: Any
    url: str
    file_name: str
    width: int
    height: int
    regions: list[Region] = field(default_factory=list)


def first_task_of_image(
    written: dict[str, str], image: TaskImage, path: object, report: ExportReport
) -> bool:
    """True the first time ``path`` is written by a one-file-per-image format (YOLO, LabelMe);
    ``written`` maps each output path to the image it was written for. A later task of the
    same image, or another image whose output has the same path (``a.jpg`` and ``a.png`` both
    give ``a.txt``), is reported as skipped instead of overwriting it."""
    earlier = written.get(str(path))
    if earlier is not None:
        if earlier == image.file_name:
            reason = f"{path} already written from another task of the same image"
        else:
            reason = (
                f"{path} already written for {earlier}: both images give one output file "
                "(same name stem); rename one of them"
            )
        report.skipped.append(Skipped(image.task_id, None, reason, image.task))
        return False
    written[str(path)] = image.file_name
    return True


class ImageWriter(Protocol):
    """An output format fed one image at a time (COCO, YOLO, LabelMe)."""

    name: str

    @property
    def holes_filled(self) -> int:
        """Masks with holes written as outer rings only."""

    def add(self, image: TaskImage, report: ExportReport) -> None:
        """Writes one image; what it cannot write goes to ``report.skipped``."""

    def close(self) -> None:
        """Writes what only the end can (category lists, the COCO file)."""


class TaskSource:
    """The tasks of a Label Studio JSON export, read for export (see the module docstring).

    Args:
        tasks: the tasks of a Label Studio JSON export (or of ``ovss-label predict``).
        include_predictions: use a task's latest prediction when it has no annotation.
        data_key: the task data field holding the image (the ``<Image value="$key">``); None
            takes ``image``, else the only string field.
        image_size: last resort for sizes (after results and ``task["meta"]``), such as
            reading the image file's header.
        prefer: the geometry kept for an object drawn as a brush and as polygons.

    Raises:
        ValueError: an item is not a Label Studio task (e.g. a JSON-MIN export).
    """

    def __init__(
        self,
        tasks: Iterable[dict[str, Any]],
        *,
        include_predictions: bool = False,
        data_key: str | None = None,
        image_size: ImageSizeLookup | None = None,
        prefer: Prefer = "brush",
    ) -> None:
        if prefer not in PREFER_CHOICES:
            raise ValueError(f"prefer must be one of {PREFER_CHOICES}, got {prefer!r}")
        self.report = ExportReport()
        self.data_key, self.image_size, self.prefer = data_key, image_size, prefer
        self._chosen: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
        for position, task in enumerate(tasks, 1):
            self.report.tasks += 1
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise ValueError(_not_a_task_message(task))
            record, source = pick_record(task, include_predictions)
            if record is None:
                self.report.unlabelled += 1
                continue
            self.report.from_predictions += source == "prediction"
            self._chosen.append((position, task, record))

    def labels(self) -> list[str]:
        """Sorted labels of the chosen records' regions, read without decoding any mask."""
        return sorted(set().union(*(record_labels(r) for _, _, r in self._chosen)))

    def images(self) -> Iterator[TaskImage]:
        """The exportable images, decoded one task at a time (a project's masks need not fit
        in memory together); what cannot be exported goes to ``report.skipped``."""
        names: dict[str, str] = {}  # file_name -> the URL it names
        for position, task, record in self._chosen:
            image = self._image(task, task_name(task, position, self.data_key), record, names)
            if image is not None:
                self.report.images += 1
                yield image

    def _image(
        self, task: dict[str, Any], name: str, record: dict[str, Any], names: dict[str, str]
    ) -> TaskImage | None:
        regions = self._regions(task, name, record)
        try:
            url = image_url(task, self.data_key)
        except ValueError as err:
            self._skip(task, name, None, str(err))
            return None
        size = _results_size(task, regions) or _size_of(task.get("meta"))
        if size is None and self.image_size is not None:
            size = self.image_size(task, url)
        if size is None:
            hint = "pass --image-dir" if self.image_size is None else "image file not found"
            reason = "image size unknown: no result or task meta has original_width/height"
            self._skip(task, name, None, f"{reason}; {hint}")
            return None
        image = TaskImage(name, task.get("id"), url, _distinct_name(url, names), *size)
        for region, inst in regions:
            if (inst.width, inst.height) != size:
                reason = f"region size {inst.width}x{inst.height} differs from image"
                self._skip(task, name, region, f"{reason} {image.width}x{image.height}")
            elif not inst.mask.any():
                self._skip(task, name, region, "empty region (no pixels)")
            else:
                image.regions.append((region, inst))
                self.report.per_category[inst.label] += 1
        return image

    def _regions(self, task: dict[str, Any], name: str, record: dict[str, Any]) -> list[Region]:
        regions: list[Region] = []
        for result in record.get("result") or []:
            if not isinstance(result, dict):
                continue
            kind = str(result.get("type", "")).lower()
            if kind not in REGION_TYPES:
                self.report.other_results[kind or "untyped"] += 1
                continue
            try:
                instance = result_to_instance(result)
            except RegionError as err:
                self._skip(task, name, err.region_id, str(err))
                continue
            if instance is not None:
                regions.append((result.get("id"), instance))
        merged, folded = merge_same_instances(regions, self.prefer)
        self.report.merged += folded
        return merged

    def _skip(self, task: dict[str, Any], name: str, region: str | None, reason: str) -> None:
        self.report.skipped.append(Skipped(task.get("id"), region, reason, name))


def export_images(
    source: TaskSource, writers: Sequence[ImageWriter], categories: Sequence[str] | None = None
) -> ExportReport:
    """Feeds every image of ``source`` to every writer, closes them, and returns the report.

    Args:
        categories: the category order the writers were given; labels met outside it are
            listed in ``extra_categories``.
    """
    for image in source.images():
        for writer in writers:
            writer.add(image, source.report)
    report = source.report
    for writer in writers:
        writer.close()
        report.holes_filled[writer.name] += writer.holes_filled
    if categories is not None:
        report.extra_categories = [c for c in report.per_category if c not in categories]
    return report


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


def record_labels(record: dict[str, Any] | None, types: Collection[str] = REGION_TYPES) -> set[str]:
    """The labels on an annotation's or prediction's results of ``types`` (lower-case result
    types), read without decoding any mask: each result's first name in ``value[<type>]``
    (else ``value["labels"]``), the label ``result_to_instance`` gives its region."""
    labels = set()
    for result in (record or {}).get("result") or []:
        kind = str(result.get("type", "")).lower() if isinstance(result, dict) else ""
        value = result.get("value") if kind in types else None
        label = region_label(value, kind)
        if label is not None:
            labels.add(label)
    return labels


def labels_by_image(
    tasks: Iterable[dict[str, Any]], types: Collection[str] = IMAGE_RESULT_TYPES
) -> dict[str, list[str]]:
    """Image base name (``file_name``) -> the sorted labels of its task's annotation
    (``pick_record``; predictions are not labels), for tasks that have both: the classes present
    in each image, as ``tune`` takes them. A task whose image field cannot be told is left out."""
    found: dict[str, list[str]] = {}
    for task in tasks:
        record, _ = pick_record(task) if isinstance(task, dict) else (None, "")
        names = sorted(record_labels(record, types))
        try:
            url = image_url(task) if names else ""
        except (ValueError, KeyError, TypeError):  # no data object, or no telling the field
            continue
        if url:
            found[file_name(url)] = names
    return found


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


def task_name(task: dict[str, Any], position: int, data_key: str | None = None) -> str:
    """How reports name a task: ``task <id>``, else ``image <path>``, else its position."""
    if task.get("id") is not None:
        return f"task {task['id']}"
    try:
        return f"image {image_path(image_url(task, data_key))}"
    except (ValueError, KeyError, TypeError):
        return f"task #{position} in the file"


def image_url(task: dict[str, Any], data_key: str | None = None) -> str:
    """The image URL or path of a task (``data[data_key]``; see ``TaskSource``).

    Raises:
        ValueError: no such field, or no way to tell which field is the image (the message
            does not name the task: reports do).
    """
    data = task["data"]
    if data_key is not None:
        if data_key not in data:
            raise ValueError(f"no data field {data_key!r}")
        return str(data[data_key])
    if "image" in data:
        return str(data["image"])
    strings = [v for v in data.values() if isinstance(v, str)]
    if len(strings) != 1:
        raise ValueError(
            f"cannot tell which data field is the image ({sorted(data)}); "
            "pass the label config or the data key"
        )
    return strings[0]


def image_path(url: str) -> str:
    """The image's relative POSIX path (COCO ``file_name``; see the module docstring).

    ``.`` and ``..`` segments are dropped, so the path stays inside any folder it is joined to.
    """
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d")  # /data/local-files/?d=relative/path.jpg
    if local and parsed.path.rstrip("/").endswith("local-files"):
        path = local[0]  # parse_qs has unquoted it already
    elif parsed.scheme in ("", "http", "https", "file"):
        path = unquote(parsed.path)
        if path.startswith("/data/upload/"):  # Label Studio's media folder holds upload/<id>/
            path = path[len("/data/") :]
    else:  # s3://bucket/key, gs://bucket/key, azure-blob://container/key
        path = unquote(f"{parsed.netloc}/{parsed.path}")
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or parsed.netloc.replace(":", "_") or "image"


def file_name(url: str) -> str:
    """The base name of a task's image (matching images by name; ``image_path`` is the path)."""
    return posixpath.basename(image_path(url))


def _distinct_name(url: str, taken: dict[str, str]) -> str:
    """``image_path(url)``, told apart from other URLs of ``taken`` (name -> URL) sharing it."""
    return next(n for n in _candidate_names(url) if taken.setdefault(n, url) == url)


def _candidate_names(url: str) -> Iterator[str]:
    path = image_path(url)
    yield path
    host = urlparse(url).netloc.replace(":", "_")  # "host:8080" is not a portable folder name
    if host:
        yield f"{host}/{path}"
    stem, ext = posixpath.splitext(path)
    for n in itertools.count(2):
        yield f"{stem}-{n}{ext}"


def _results_size(task: dict[str, Any], regions: list[Region]) -> tuple[int, int] | None:
    """(width, height) of the first region, else of any result of the task that has one."""
    if regions:
        return regions[0][1].width, regions[0][1].height
    for record in (task.get("annotations") or []) + (task.get("predictions") or []):
        for result in (record.get("result") if isinstance(record, dict) else None) or []:
            size = _size_of(result)
            if size is not None:
                return size
    return None


def _size_of(item: Any) -> tuple[int, int] | None:
    """``(original_width, original_height)`` of a result or a task's ``meta``, if valid."""
    if not isinstance(item, dict):
        return None
    width, height = item.get("original_width"), item.get("original_height")
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    return None


def _not_a_task_message(task: Any) -> str:
    if isinstance(task, dict) and "image" in task and "data" not in task:
        return "this looks like a JSON-MIN export; export the project as JSON instead"
    return f"not a Label Studio task (no 'data' object): {str(task)[:80]}"
