"""Batch prediction over image files: the job behind ``ovss-label predict``.

Writes what Label Studio imports: one task per image, ``{"data": {<key>: <url>}, "predictions":
[{"model_version", "score", "result"}]}``, with results for the project's controls (brush RLE,
polygons or both). A file that cannot be decoded or fails in the model is reported and skipped;
the others still get predictions.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovss_label.converters import CocoWriter, Instance, instances_to_results, write_overlay
from ovss_label.images import load_rgb
from ovss_label.ontologies import BRUSH_TAG, IMAGE_TAG, POLYGON_TAG, Vocabulary, class_colors

from .proposers import FeatureCache, PostprocessConfig, Proposer, proposal_to_instances, propose

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def collect_images(patterns: Sequence[str]) -> list[Path]:
    """Image files named by files, folders (their images, sorted) and globs, in given order.

    Raises:
        ValueError: A path matches nothing, or no image at all was found.
    """
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ValueError(f"{pattern}: no such file, folder or glob match")
            found += [Path(m) for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES]
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {list(patterns)}")
    return unique


@dataclass(frozen=True)
class Output:
    """Which Label Studio controls the results target.

    Attributes:
        kind: ``brush``, ``polygon`` or ``both``.
        brush_name: ``from_name`` of the BrushLabels control.
        polygon_name: ``from_name`` of the PolygonLabels control.
        to_name: The Image object's name.
        data_key: Task data field of the image (``$image`` -> ``image``).
    """

    kind: str = "brush"
    brush_name: str = BRUSH_TAG
    polygon_name: str = POLYGON_TAG
    to_name: str = IMAGE_TAG
    data_key: str = "image"

    @classmethod
    def from_label_config(cls, config_xml: str, kind: str | None) -> Output:
        """Control names from a labeling config; ``kind`` None picks what the config has."""
        from label_studio_sdk.label_interface.interface import LabelInterface

        return cls.from_interface(LabelInterface(config_xml), kind)

    @classmethod
    def from_interface(cls, interface: Any, kind: str | None) -> Output:
        """:meth:`from_label_config` for a parsed SDK ``LabelInterface`` (parse a large
        config once, not once per reader)."""
        names = {c.tag: c for c in interface.controls}
        brush, polygon = names.get("BrushLabels"), names.get("PolygonLabels")
        available = [k for k, c in (("brush", brush), ("polygon", polygon)) if c is not None]
        if not available:
            raise ValueError("the labeling config has no BrushLabels or PolygonLabels control")
        kind = kind or ("both" if len(available) == 2 else available[0])
        needed = ["brush", "polygon"] if kind == "both" else [kind]
        missing = [k for k in needed if k not in available]
        if missing:
            raise ValueError(
                f"--format {kind} needs a {missing[0]} control; config has {available}"
            )
        control = brush if brush is not None else polygon
        assert control is not None  # `available` is not empty
        to_name = control.to_name[0]
        image = next((o for o in interface.objects if o.name == to_name), None)
        if image is None or image.tag != "Image":
            raise ValueError(
                f"control {control.name!r} does not point at an <Image> (toName={to_name!r})"
            )
        return cls(
            kind,
            brush.name if brush else BRUSH_TAG,
            polygon.name if polygon else POLYGON_TAG,
            to_name,
            image.value.lstrip("$"),
        )

    def results(self, instances: list[Instance]) -> list[dict[str, Any]]:
        """Label Studio result items for one image's instances."""
        results: list[dict[str, Any]] = instances_to_results(
            instances,
            self.kind,
            brush_name=self.brush_name,
            polygon_name=self.polygon_name,
            to_name=self.to_name,
        )
        return results


@dataclass
class PredictReport:
    """What a run did: images predicted, instances written, files skipped with reasons."""

    predicted: int = 0
    instances: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form; absolute when it is outside ``root``."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def local_files_url(path: Path, root: Path, prefix: str = "/data/local-files/?d=") -> str:
    """Label Studio local-storage URL of ``path`` relative to its document ``root``."""
    return prefix + relative_name(path, root)


def predict_files(
    proposer: Proposer,
    vocabulary: Vocabulary,
    paths: Sequence[Path],
    *,
    output: Output,
    url_for: Callable[[Path], str],
    name_for: Callable[[Path], str] = lambda path: path.name,
    postprocess: PostprocessConfig | None = None,
    cache: FeatureCache | None = None,
    coco: CocoWriter | None = None,
    overlay_dir: Path | None = None,
    advance: Callable[[Path], None] | None = None,
) -> tuple[list[dict[str, Any]], PredictReport]:
    """Predicts every image; returns Label Studio tasks (one per readable image) and a report."""
    post = postprocess or PostprocessConfig()
    colors = dict(zip(vocabulary.names, class_colors(len(vocabulary)), strict=True))
    tasks, report = [], PredictReport()
    names = overlay_names(paths)
    for path in paths:
        try:
            image = load_rgb(path)
            instances = proposal_to_instances(propose(proposer, image, vocabulary, cache), post)
        except (ValueError, RuntimeError, OSError, MemoryError) as exc:
            log.warning("skipped %s: %s", path, exc)
            report.failed.append((path, str(exc)))
        else:
            url = url_for(path)
            tasks.append(_task(url, output, instances, proposer.model_version))
            report.predicted += 1
            report.instances += len(instances)
            if coco is not None:
                image_id = coco.add_image(name_for(path), image.shape[1], image.shape[0])
                for inst in instances:
                    coco.add_instance(image_id, inst)
            if overlay_dir is not None:
                target = overlay_dir / names[path]
                write_overlay(target, image, instances, colors, title=proposer.model_version)
        if advance:
            advance(path)
    return tasks, report


def _task(url: str, output: Output, instances: list[Instance], version: str) -> dict[str, Any]:
    scores = [inst.score for inst in instances if inst.score is not None]
    prediction = {
        "model_version": version,
        "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
        "result": output.results(instances),
    }
    return {"data": {output.data_key: url}, "predictions": [prediction]}


def overlay_names(paths: Sequence[Path]) -> dict[Path, str]:
    """PNG name per input: its stem, plus a path hash where stems repeat (no overwrites)."""
    stems = [p.stem for p in paths]
    names = {}
    for path, stem in zip(paths, stems, strict=True):
        if stems.count(stem) > 1:
            stem += "-" + hashlib.sha1(str(path).encode()).hexdigest()[:8]
        names[path] = f"{stem}.png"
    return names


__all__ = [
    "Output",
    "PredictReport",
    "collect_images",
    "local_files_url",
    "overlay_names",
    "predict_files",
    "relative_name",
]
