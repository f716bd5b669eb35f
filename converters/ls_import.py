"""COCO to Label Studio tasks with the COCO annotations as predictions (bring existing labels in).

Output contract: a Label Studio import file, a JSON list of
``{"data": {"image": <url>}, "predictions": [{"model_version", "score", "result": [...]}]}``.
Result items follow ``labelstudio``: COCO polygons become ``polygonlabels`` (their own
vertices), RLE masks ``brushlabels`` (exact, holes kept), bbox-only annotations
``rectanglelabels``; ``fmt`` can force brush or polygon for every mask-like annotation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .coco import CocoImage
from .instance import Instance
from .labelstudio import instance_to_results

__all__ = ["ImportReport", "coco_to_tasks"]

ImportFormat = Literal["auto", "brush", "polygon"]

# Label-config kinds (ontologies.label_config) in output order, keyed by result type.
_CONFIG_KIND = {"brushlabels": "brush", "polygonlabels": "polygon", "rectanglelabels": "rectangle"}


@dataclass
class ImportReport:
    """Counts for the summary table; ``config_kind`` is the label-config kind the tasks need."""

    images: int = 0
    per_category: Counter[str] = field(default_factory=Counter)
    per_type: Counter[str] = field(default_factory=Counter)
    holes_dropped: int = 0

    @property
    def config_kind(self) -> str:
        kinds = [k for t, k in _CONFIG_KIND.items() if self.per_type[t]]
        return "+".join(kinds) or "brush"


def coco_to_tasks(
    images: Sequence[CocoImage],
    *,
    image_root: str | None = None,
    fmt: ImportFormat = "auto",
    model_version: str = "coco-import",
    tolerance_px: float = 1.0,
) -> tuple[list[dict[str, Any]], ImportReport]:
    """Label Studio tasks for COCO images, their annotations as one prediction per task.

    Args:
        images: reader output (``coco.read_coco``).
        image_root: URL or path prefix for ``file_name`` (e.g. ``/data/local-files/?d=photos/``
            or ``https://bucket/images/``). None uses the ``ls_image_url`` our export stored,
            else the bare ``file_name``.
        fmt: ``auto`` (polygons stay polygons, RLE masks become brush), ``brush`` or ``polygon``
            (masks traced; Label Studio polygons drop holes, counted in the report).
        model_version: the predictions' ``model_version``.
        tolerance_px: polygon simplification tolerance for traced masks.
    """
    if fmt not in ("auto", "brush", "polygon"):
        raise ValueError(f"fmt must be auto, brush or polygon, got {fmt!r}")
    report = ImportReport()
    tasks = []
    for image in images:
        results = []
        for inst in image.instances:
            kind = _output_kind(inst, fmt)
            report.holes_dropped += kind == "polygon" and inst.has_holes()
            items = instance_to_results(inst, kind, tolerance_px=tolerance_px)
            report.per_category[inst.label] += bool(items)
            report.per_type.update(item["type"] for item in items)
            results += items
        tasks.append(
            {
                "data": {"image": _url(image, image_root)},
                "predictions": [_prediction(results, image.instances, model_version)],
            }
        )
        report.images += 1
    return tasks, report


def _output_kind(instance: Instance, fmt: ImportFormat) -> Literal["brush", "polygon"]:
    if fmt != "auto":
        return fmt
    return "polygon" if instance.kind == "polygon" else "brush"


def _url(image: CocoImage, image_root: str | None) -> str:
    if image_root is not None:
        sep = "" if image_root.endswith(("/", "=")) or not image_root else "/"
        return f"{image_root}{sep}{image.file_name}"
    return str(image.extra.get("ls_image_url") or image.file_name)


def _prediction(
    results: list[dict[str, Any]], instances: list[Instance], model_version: str
) -> dict[str, Any]:
    prediction: dict[str, Any] = {"model_version": model_version, "result": results}
    scores = [i.score for i in instances if i.score is not None]
    if scores:
        prediction["score"] = round(sum(scores) / len(scores), 6)
    return prediction
