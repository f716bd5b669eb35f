"""How much annotators changed our proposals: annotations that started from a prediction vs it.

Format contract (Label Studio "JSON" export 1.20-1.23; tasks as in ``converters.ls_tasks``)
==========================================================================================
- A prediction: ``{"id", "model_version", "result": [...], "score", "created_at"}``; an
  annotation: ``{"id", "result", "was_cancelled", "parent_prediction", "parent_annotation",
  "created_at", "updated_at", "completed_by", "lead_time"}``. ``parent_prediction`` is the id
  of the prediction the annotator started from (Label Studio ``tasks/models.py``), or null.
- A *pair* is a non-cancelled annotation whose ``parent_prediction`` names a prediction of its
  task. Cancelled annotations are ignored; the others are counted as ``without_parent`` (null)
  or ``missing_parent`` (an id not among the task's predictions).
- Region results (``REGION_TYPES``) are decoded by ``result_to_instance``; an object drawn as a
  brush and as polygons is one object (``merge_same_instances``, the brush kept). Per class the
  masks are unioned: (H, W) bool, the size from the results' ``original_width/height`` (a
  record without regions takes the other's). A class is *present* when its union has a pixel.
- Per class present in either record: ``I`` = pixels in both, ``U`` = pixels in either, ``IoU
  = I / U``. A pair is *unchanged* when every class has ``I == U`` (pixel-identical per class),
  as are two records without any region.
- A pair with an undecodable region, or whose records disagree on the image size, is skipped
  with its reason; bad data never raises (non-dict tasks, annotations and predictions are
  skipped the same way). A task without ``id`` is named by its position in the file.
- Label Studio's own JSON export lists a task's predictions by id only (``"predictions":
  [12]``; LS 1.23 ``data_export``: predictions are an expandable field the quick export does
  not expand): such ids are counted (``prediction_ids_only``), not compared. A live project is
  read with its predictions attached (``lsapi.attach_predictions``).
- Per ``model_version`` (of the parent prediction): pooled per-class IoU ``ΣI / ΣU``, the mean
  of the pairs' mean IoU, and per class the pairs that corrected it (``I < U``). Fractions are
  in [0, 1].
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ovss_label.converters.labelstudio import RegionError, result_to_instance
from ovss_label.converters.ls_regions import Region, merge_same_instances

__all__ = [
    "NO_VERSION",
    "AgreementReport",
    "PairAgreement",
    "VersionAgreement",
    "agreement",
    "agreement_json",
]

NO_VERSION = "(no model_version)"
"""The version of a prediction without a ``model_version``."""

MOST_CORRECTED = 5
"""How many classes ``VersionAgreement.most_corrected`` lists at most."""

ClassMasks = dict[str, NDArray[np.bool_]]
"""Class name -> (H, W) bool union of the class's masks in one record (never empty)."""


@dataclass(frozen=True)
class PairAgreement:
    """One annotation against the prediction it started from.

    Attributes:
        task_id: The task's ``id`` (None when the task has none).
        annotation_id: The annotation's ``id``.
        prediction_id: Its ``parent_prediction``.
        model_version: The prediction's ``model_version`` (``NO_VERSION`` if none).
        per_class: Class -> (intersection, union) pixel counts, for the classes present in
            either record; union > 0.
        unchanged: Every class pixel-identical (also when neither record has a region).
        mean_iou: Mean per-class IoU; None when no class is present.
    """

    task_id: Any
    annotation_id: Any
    prediction_id: Any
    model_version: str
    per_class: dict[str, tuple[int, int]]
    unchanged: bool
    mean_iou: float | None


@dataclass(frozen=True)
class VersionAgreement:
    """The pairs of one model version, summed up.

    Attributes:
        model_version: The version (``NO_VERSION`` for predictions without one).
        annotations: Pairs (annotations started from a prediction of this version).
        unchanged: Pairs submitted pixel-identical.
        unchanged_fraction: ``unchanged / annotations``.
        mean_iou: Mean of the pairs' ``mean_iou`` where defined; None if none is.
        per_class_iou: Class -> pooled IoU ``ΣI / ΣU`` over the pairs.
        corrected: Class -> pairs where the class's IoU < 1 (0 for classes never changed).
        most_corrected: Up to ``MOST_CORRECTED`` classes with ``corrected > 0``, by pooled IoU
            ascending, then corrected count descending, then name.
    """

    model_version: str
    annotations: int
    unchanged: int
    unchanged_fraction: float
    mean_iou: float | None
    per_class_iou: dict[str, float]
    corrected: dict[str, int]
    most_corrected: list[str]


@dataclass(frozen=True)
class AgreementReport:
    """Agreement over a Label Studio export.

    Attributes:
        versions: One entry per model version, sorted by ``model_version``.
        pairs: Every compared pair, in export order.
        without_parent: Non-cancelled annotations with no ``parent_prediction``.
        missing_parent: Annotations whose ``parent_prediction`` is not among the task's
            predictions.
        skipped: (item, reason) of everything left out because it could not be read.
        prediction_ids_only: Predictions given as bare ids, as Label Studio's JSON export
            writes them (``predictions: [12, 13]``): they cannot be compared; a live project
            is read with its predictions (``lsapi.attach_predictions``).
    """

    versions: list[VersionAgreement]
    pairs: list[PairAgreement]
    without_parent: int
    missing_parent: int
    skipped: list[tuple[str, str]]
    prediction_ids_only: int = 0


class _PairError(ValueError):
    """A pair that cannot be compared; the message says why."""


@dataclass(frozen=True)
class _Record:
    """A prediction's or annotation's regions: ``masks`` per class, ``size`` (H, W) or None."""

    masks: ClassMasks
    size: tuple[int, ...] | None


def agreement(tasks: Iterable[dict[str, Any]]) -> AgreementReport:
    """Compares every annotation that started from a prediction with it (module docstring).

    Args:
        tasks: The tasks of a Label Studio JSON export; items that are not tasks are skipped.
    """
    reader = _Reader()
    for position, task in enumerate(tasks, 1):
        reader.task(task, position)
    pairs = reader.pairs
    return AgreementReport(
        _versions(pairs), pairs, reader.without_parent, reader.missing_parent, reader.skipped,
        reader.ids_only,
    )  # fmt: skip


@dataclass
class _Reader:
    """Reads tasks one at a time into pairs, counts and skip reasons."""

    pairs: list[PairAgreement] = field(default_factory=list)
    without_parent: int = 0
    missing_parent: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ids_only: int = 0
    # The task being read: its name in reports, its predictions by id, those decoded so far.
    _task: dict[str, Any] = field(default_factory=dict)
    _name: str = ""
    _predictions: dict[Any, dict[str, Any]] = field(default_factory=dict)
    _decoded: dict[Any, _Record | str] = field(default_factory=dict)

    def task(self, task: Any, position: int) -> None:
        name = f"task #{position} in the file"
        if not isinstance(task, dict):
            self.skipped.append((name, "not a task object"))
            return
        self._task = task
        self._name = name if task.get("id") is None else f"task {task['id']}"
        self._predictions, self._decoded = {}, {}
        for index, prediction in enumerate(self._list("predictions"), 1):
            if isinstance(prediction, dict) and _is_id(prediction.get("id")):
                self._predictions[prediction["id"]] = prediction
            elif isinstance(prediction, int) and not isinstance(prediction, bool):
                # Label Studio's JSON export lists prediction ids only
                self.ids_only += 1
            else:
                self._skip(f"prediction #{index}", "not a prediction with an id")
        for index, annotation in enumerate(self._list("annotations"), 1):
            if not isinstance(annotation, dict):
                self._skip(f"annotation #{index}", "not an annotation object")
            elif not annotation.get("was_cancelled"):
                self._annotation(annotation)

    def _decode_parent(self, parent: Any, prediction: dict[str, Any]) -> _Record | str:
        try:
            self._decoded[parent] = _decode(prediction, f"prediction {parent}")
        except _PairError as err:
            self._decoded[parent] = str(err)
        return self._decoded[parent]

    def _skip(self, item: str, reason: str) -> None:
        self.skipped.append((f"{self._name} {item}".rstrip(), reason))

    def _list(self, key: str) -> list[Any]:
        records = self._task.get(key) or []
        if isinstance(records, list):
            return records
        self._skip("", f"{key} is not a list")
        return []

    def _annotation(self, annotation: dict[str, Any]) -> None:
        parent = annotation.get("parent_prediction")
        prediction = self._predictions.get(parent) if _is_id(parent) else None
        if prediction is None:
            self.without_parent += parent is None
            self.missing_parent += parent is not None
            return
        try:  # several annotations may start from one prediction: decode it once
            proposed = self._decoded.get(parent) or self._decode_parent(parent, prediction)
            if isinstance(proposed, str):
                raise _PairError(proposed)
            per_class = _per_class(proposed, _decode(annotation, "annotation"))
        except _PairError as err:
            self._skip(f"annotation {annotation.get('id')}", str(err))
            return
        version = prediction.get("model_version")
        self.pairs.append(
            PairAgreement(
                task_id=self._task.get("id"),
                annotation_id=annotation.get("id"),
                prediction_id=parent,
                model_version=str(version) if version not in (None, "") else NO_VERSION,
                per_class=per_class,
                unchanged=all(i == u for i, u in per_class.values()),
                mean_iou=_mean([i / u for i, u in per_class.values()]),
            )
        )


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _decode(record: dict[str, Any], what: str) -> _Record:
    """A record's region results as per-class masks (module docstring).

    Raises:
        _PairError: a region cannot be decoded, or regions disagree on the image size.
    """
    results = record.get("result") or []
    if not isinstance(results, list):
        raise _PairError(f"{what} result is not a list")
    regions: list[Region] = []
    for result in results:
        if not isinstance(result, dict):
            continue  # not a region (as ls_tasks reads exports)
        try:
            instance = result_to_instance(result)
        except RegionError as err:
            raise _PairError(f"{what} region {err.region_id}: {err}") from err
        except (AttributeError, TypeError) as err:  # e.g. a "value" that is not an object
            raise _PairError(f"{what} region {result.get('id')}: malformed ({err})") from err
        if instance is not None:
            regions.append((result.get("id"), instance))
    sizes = sorted({inst.mask.shape for _, inst in regions})
    if len(sizes) > 1:
        raise _PairError(f"{what} regions have different image sizes: {_sizes(sizes)}")
    masks: ClassMasks = {}
    for _, inst in merge_same_instances(regions, "brush")[0]:
        masks[inst.label] = masks[inst.label] | inst.mask if inst.label in masks else inst.mask
    present = {label: mask for label, mask in masks.items() if mask.any()}
    return _Record(present, sizes[0] if sizes else None)


def _sizes(shapes: Iterable[tuple[int, ...]]) -> str:
    return ", ".join(f"{shape[1]}x{shape[0]}" for shape in shapes)


def _per_class(proposed: _Record, submitted: _Record) -> dict[str, tuple[int, int]]:
    """Class -> (I, U) pixel counts over the classes present in either record.

    Raises:
        _PairError: the records' image sizes differ.
    """
    if proposed.size and submitted.size and proposed.size != submitted.size:
        sizes = _sizes([submitted.size]), _sizes([proposed.size])
        raise _PairError(f"annotation is {sizes[0]}, prediction is {sizes[1]}")
    counts = {}
    for label in sorted(proposed.masks.keys() | submitted.masks.keys()):
        a, b = proposed.masks.get(label), submitted.masks.get(label)
        both = int(np.count_nonzero(a & b)) if a is not None and b is not None else 0
        counts[label] = (both, _area(a) + _area(b) - both)
    return counts


def _area(mask: NDArray[np.bool_] | None) -> int:
    return 0 if mask is None else int(np.count_nonzero(mask))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _versions(pairs: list[PairAgreement]) -> list[VersionAgreement]:
    by_version: dict[str, list[PairAgreement]] = {}
    for pair in pairs:
        by_version.setdefault(pair.model_version, []).append(pair)
    return [_version(v, by_version[v]) for v in sorted(by_version)]


def _version(model_version: str, pairs: list[PairAgreement]) -> VersionAgreement:
    intersection, union, corrected = Counter[str](), Counter[str](), Counter[str]()
    for pair in pairs:
        for label, (i, u) in pair.per_class.items():
            intersection[label] += i
            union[label] += u
            corrected[label] += i < u
    pooled = {label: intersection[label] / union[label] for label in sorted(union)}
    means = [p.mean_iou for p in pairs if p.mean_iou is not None]
    unchanged = sum(p.unchanged for p in pairs)
    ranked = sorted(
        (label for label, n in corrected.items() if n > 0),
        key=lambda label: (pooled[label], -corrected[label], label),
    )
    return VersionAgreement(
        model_version=model_version,
        annotations=len(pairs),
        unchanged=unchanged,
        unchanged_fraction=unchanged / len(pairs),
        mean_iou=_mean(means),
        per_class_iou=pooled,
        corrected=dict(sorted(corrected.items())),
        most_corrected=ranked[:MOST_CORRECTED],
    )


def agreement_json(report: AgreementReport) -> dict[str, Any]:
    """The report as JSON-ready data (fractions in [0, 1], rounded to 6 decimals)::

    {"versions": {"<model_version>": {"annotations", "unchanged", "unchanged_fraction",
    "mean_iou", "per_class_iou": {class: iou}, "corrected": {class: n}, "most_corrected":
    [class, ...]}}, "without_parent", "missing_parent", "skipped": [{"item", "reason"}]}
    """
    fields = [asdict(v) for v in report.versions]
    return {
        "versions": {f.pop("model_version"): _rounded(f) for f in fields},
        "without_parent": report.without_parent,
        "missing_parent": report.missing_parent,
        "skipped": [{"item": item, "reason": reason} for item, reason in report.skipped],
        "prediction_ids_only": report.prediction_ids_only,
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return round(value, 6) if isinstance(value, float) else value
