"""Batch prediction over image files: the job behind ``ovss-label predict``.

Writes what Label Studio imports: one task per image, ``{"data": {<key>: <url>}, "meta":
{"original_width", "original_height"}, "predictions": [{"model_version", "score", "result"}]}``,
with results for the project's controls (brush RLE, polygons or both) and the score of
``proposers/confidence.py``. ``meta`` is the size
Label Studio shows (EXIF orientation applied), so a task without regions still has a size on
export. A file that cannot be decoded or fails in the model is reported and skipped; the others
still get predictions.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ovss_label.converters import CocoWriter, Instance, ResultTargets, write_overlay
from ovss_label.images import load_rgb
from ovss_label.ontologies import Vocabulary, class_colors

from .jobs import JobReport, NoProgress, Progress
from .models.identity import is_tiny_version
from .proposers import FeatureCache, PostprocessConfig, Proposer, proposal_to_instances, propose
from .proposers.confidence import task_score

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
TINY_BANNER = "TINY RANDOM MODEL: MEANINGLESS"
"""Drawn on overlays made by tiny random twins, so a picture is never taken for a result."""


def collect_images(patterns: Sequence[str], *, recursive: bool = False) -> list[Path]:
    """Image files named by files, folders (their images, sorted) and globs, in given order.

    Paths are absolute but not symlink-resolved: Label Studio serves a file by the path under
    its document root, which may run through a symlink. A file named twice is kept once.

    Args:
        patterns: Files, folders or globs (``**`` matches sub-folders in a glob).
        recursive: Folders include the images of their sub-folders (symlinked folders are not
            followed, so a link loop cannot recurse forever).

    Raises:
        ValueError: A path matches nothing, or no image at all was found.
    """
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += _folder_images(path, recursive)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ValueError(f"{pattern}: no such file, folder or glob match")
            found += [Path(m) for m in matches if Path(m).suffix.lower() in IMAGE_SUFFIXES]
    unique: dict[Path, Path] = {}
    for found_path in found:  # keyed by the real file, so a file named twice is kept once
        unique.setdefault(found_path.resolve(), Path(os.path.abspath(found_path)))
    images = list(unique.values())
    if not images:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {list(patterns)}")
    return images


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def unsearched_folders(patterns: Sequence[str]) -> list[Path]:
    """Sub-folders of the folders in ``patterns``: what ``recursive=False`` did not search."""
    folders = [Path(p) for p in patterns if Path(p).is_dir()]
    return sorted(sub for folder in folders for sub in folder.iterdir() if sub.is_dir())


Output = ResultTargets
"""The result targets by their former name (``converters.ls_project.ResultTargets``)."""


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form, as Label Studio's local-files URL takes it.

    Compared as given first (a path through a symlink under ``root`` stays under it), then
    with both resolved.

    Raises:
        ValueError: ``path`` is not under ``root`` (Label Studio would not serve it).
    """
    for mine, base in ((path.absolute(), root.absolute()), (path.resolve(), root.resolve())):
        try:
            return Path(os.path.normpath(mine)).relative_to(os.path.normpath(base)).as_posix()
        except ValueError:
            continue
    raise ValueError(f"{path} is not under the document root {root}")


def local_files_url(path: Path, root: Path, prefix: str = "/data/local-files/?d=") -> str:
    """Label Studio local-storage URL of ``path`` relative to its document ``root``."""
    return prefix + relative_name(path, root)


PREDICT_ERRORS = (ValueError, RuntimeError, OSError, MemoryError)
"""What fails one image, not the job: the image is reported and skipped."""


@dataclass(frozen=True)
class ImageResult:
    """One image's share of a ``predict`` run's outputs, in JSON types: made per image in one
    process and on Ray alike (``scale/ray_predict.py`` stores it as a record), and merged in
    input order by :func:`collect`, so both runs write the same files.

    Attributes:
        path: The input file.
        reason: Why it failed ("" when it did not; then ``task`` is None).
        task: Its Label Studio task.
        name: Its COCO ``file_name``.
        size: (width, height) as shown (EXIF orientation applied).
        instances: Instances predicted.
        annotations: ``(label, annotation)`` per COCO annotation, numbered when merged.
        holes_filled: Masks with holes written as polygons (``CocoWriter.holes_filled``).
    """

    path: str
    reason: str = ""
    task: dict[str, Any] | None = None
    name: str = ""
    size: tuple[int, int] = (0, 0)
    instances: int = 0
    annotations: tuple[tuple[str, dict[str, Any]], ...] = ()
    holes_filled: int = 0


def failure(path: Path, exc: Exception) -> ImageResult:
    """The result of an image that failed with ``exc`` (a short reason without the path)."""
    # Reported by the caller from its report; a log line too would say it twice.
    log.debug("skipped %s: %s", path, exc)
    return ImageResult(str(path), reason=_reason(exc, path))


@dataclass(frozen=True)
class ImageOutputs:
    """What each image of a ``predict`` run writes; picklable (Ray tasks get a copy).

    Attributes:
        vocabulary: The classes (overlay colours, COCO categories).
        output: The result targets of the tasks.
        version: ``model_version`` of every prediction and overlay title.
        post: Post-processing (``min_area`` also bounds polygon parts).
        coco: ``(segmentation, tolerance_px, min_polygon_iou)`` of the COCO writer; None: no COCO.
        overlay_dir: Where overlay PNGs go; None: none.
    """

    vocabulary: Vocabulary
    output: ResultTargets
    version: str
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    coco: tuple[Any, float, float] | None = None
    overlay_dir: Path | None = None

    def result(
        self,
        path: Path,
        image: NDArray[np.uint8],
        instances: list[Instance],
        score: float,
        *,
        url: str,
        name: str,
        overlay: str,
    ) -> ImageResult:
        """The task, COCO annotations and overlay (written to ``overlay_dir / overlay``) of
        ``image`` ((H, W, 3) uint8 RGB, as shown), its instances and its prediction's
        ``score`` (``proposers/confidence.py``)."""
        height, width = image.shape[:2]  # the oriented frame: EXIF applied by load_rgb
        size = (width, height)
        task = _task(url, self.output, instances, self.version, size, self.post.min_area, score)
        annotations: tuple[tuple[str, dict[str, Any]], ...] = ()
        holes = 0
        if self.coco is not None:  # ids are given when merged (collect): numbered in order
            mode, tolerance, min_iou = self.coco
            writer = CocoWriter(self.vocabulary.names, segmentation=mode, tolerance_px=tolerance,
                                min_polygon_iou=min_iou)  # fmt: skip
            writer.add_image(name, width, height)
            kept = [(inst.label, writer.add_instance(1, inst)) for inst in instances]
            annotations = tuple((label, ann) for label, ann in kept if ann is not None)
            holes = writer.holes_filled
        if self.overlay_dir is not None:
            colors = dict(zip(self.vocabulary.names, class_colors(len(self.vocabulary)),
                              strict=True))  # fmt: skip
            banner = TINY_BANNER if uses_tiny_models(self.version) else ""
            write_overlay(self.overlay_dir / overlay, image, instances, colors,
                          title=self.version, banner=banner)  # fmt: skip
        return ImageResult(str(path), task=task, name=name, size=(width, height),
                           instances=len(instances), annotations=annotations,
                           holes_filled=holes)  # fmt: skip


def coco_options(coco: CocoWriter | None) -> tuple[Any, float, float] | None:
    """:attr:`ImageOutputs.coco` of a writer (None: no COCO file)."""
    if coco is None:
        return None
    return coco.segmentation, coco.tolerance_px, coco.min_polygon_iou


def collect(
    result: ImageResult,
    tasks: list[dict[str, Any]],
    report: JobReport,
    coco: CocoWriter | None = None,
) -> None:
    """Adds one image's result to the run's tasks, report and COCO writer (images and
    annotations numbered in the order results arrive: input order)."""
    if result.task is None:
        report.failed.append((result.path, result.reason))
        return
    tasks.append(result.task)
    report.done += 1
    report.count("instances", result.instances)
    if coco is not None:
        image_id = coco.add_image(result.name, *result.size)
        for label, annotation in result.annotations:
            # Replacing existing keys keeps their place: the same bytes as add_instance.
            coco.annotations.append({**annotation, "id": len(coco.annotations) + 1,
                                     "image_id": image_id,
                                     "category_id": coco.category_id(label)})  # fmt: skip
        coco.holes_filled += result.holes_filled


def predict_files(
    proposer: Proposer,
    vocabulary: Vocabulary,
    paths: Sequence[Path],
    *,
    output: ResultTargets,
    url_for: Callable[[Path], str],
    name_for: Callable[[Path], str] = lambda path: path.name,
    postprocess: PostprocessConfig | None = None,
    cache: FeatureCache | None = None,
    coco: CocoWriter | None = None,
    overlay_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], JobReport]:
    """The ``predict`` job over files (``jobs.py``): Label Studio tasks, one per readable
    image, and the report (``done`` images, ``failed`` files by path with their reasons,
    ``counts["instances"]``). Not resumable: the caller writes the outputs at the end (the
    Ray run, ``scale/ray_predict.py``, is)."""
    version = proposer.model_version
    outputs = ImageOutputs(vocabulary, output, version, postprocess or PostprocessConfig(),
                           coco_options(coco), overlay_dir)  # fmt: skip
    tasks: list[dict[str, Any]] = []
    report = JobReport("predict", version)
    progress = progress or NoProgress()
    progress.total(len(paths))
    if coco is not None:  # the COCO file names its model, as the tasks and overlays do
        coco.info.update(description="predicted by ovss-label", model_version=version)
    names = overlay_names(paths)
    for path in paths:
        try:
            image = load_rgb(path)
            proposal = propose(proposer, image, vocabulary, cache)
            instances = proposal_to_instances(proposal, outputs.post)
            score = task_score(proposal, proposer.calibration)
        except PREDICT_ERRORS as exc:
            result = failure(path, exc)
        else:
            result = outputs.result(path, image, instances, score, url=url_for(path),
                                    name=name_for(path), overlay=names[path])  # fmt: skip
        collect(result, tasks, report, coco)
        progress.advance(path.name)
    return tasks, report


def _task(
    url: str,
    output: ResultTargets,
    instances: list[Instance],
    version: str,
    size: tuple[int, int],
    min_area: float,
    score: float,
) -> dict[str, Any]:
    prediction = {
        "model_version": version,
        "score": round(score, 4),
        "result": output.results(instances, min_area),
    }
    meta = {"original_width": size[0], "original_height": size[1]}
    return {"data": {output.data_key: url}, "meta": meta, "predictions": [prediction]}


def _reason(exc: Exception, path: Path) -> str:
    """``exc``'s message without ``path`` in it (decoders name the file, often twice)."""
    text = str(exc)
    for form in (f"'{path}'", f'"{path}"', str(path)):
        text = text.replace(form, "")
    return re.sub(r"\s+:", ":", " ".join(text.split())) or type(exc).__name__


def uses_tiny_models(version: str) -> bool:
    """True when a ``model_version`` names tiny random twins (``models/identity.py``)."""
    return is_tiny_version(version)


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
    "PREDICT_ERRORS",
    "TINY_BANNER",
    "ImageOutputs",
    "ImageResult",
    "Output",
    "coco_options",
    "collect",
    "collect_images",
    "failure",
    "local_files_url",
    "overlay_names",
    "predict_files",
    "relative_name",
    "unsearched_folders",
    "uses_tiny_models",
]
