"""Batch prediction over image files: the job behind ``ovss-label predict``.

Writes what Label Studio imports: one task per image, ``{"data": {<key>: <url>}, "meta":
{"original_width", "original_height"}, "predictions": [{"model_version", "score", "result"}]}``,
with results for the project's controls (brush RLE, polygons or both). ``meta`` is the size
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
from pathlib import Path
from typing import Any

from ovss_label.converters import CocoWriter, Instance, ResultTargets, write_overlay
from ovss_label.images import load_rgb
from ovss_label.ontologies import Vocabulary, class_colors

from .jobs import JobReport, NoProgress, Progress
from .models.identity import is_tiny_version
from .proposers import FeatureCache, PostprocessConfig, Proposer, proposal_to_instances, propose

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
    ``counts["instances"]``). Not resumable: the caller writes the outputs at the end."""
    post = postprocess or PostprocessConfig()
    version = proposer.model_version
    colors = dict(zip(vocabulary.names, class_colors(len(vocabulary)), strict=True))
    banner = TINY_BANNER if uses_tiny_models(version) else ""
    tasks, report = [], JobReport("predict", version)
    progress = progress or NoProgress()
    progress.total(len(paths))
    if coco is not None:  # the COCO file names its model, as the tasks and overlays do
        coco.info.update(description="predicted by ovss-label", model_version=version)
    names = overlay_names(paths)
    for path in paths:
        try:
            image = load_rgb(path)
            instances = proposal_to_instances(propose(proposer, image, vocabulary, cache), post)
        except (ValueError, RuntimeError, OSError, MemoryError) as exc:
            # Reported by the caller from `report`; a log line too would say it twice.
            log.debug("skipped %s: %s", path, exc)
            report.failed.append((str(path), _reason(exc, path)))
        else:
            height, width = image.shape[:2]  # the oriented frame: EXIF applied by load_rgb
            size = (width, height)
            tasks.append(_task(url_for(path), output, instances, version, size, post.min_area))
            report.done += 1
            report.count("instances", len(instances))
            if coco is not None:
                image_id = coco.add_image(name_for(path), width, height)
                for inst in instances:
                    coco.add_instance(image_id, inst)
            if overlay_dir is not None:
                target = overlay_dir / names[path]
                write_overlay(target, image, instances, colors, title=version, banner=banner)
        progress.advance(path.name)
    return tasks, report


def _task(
    url: str,
    output: ResultTargets,
    instances: list[Instance],
    version: str,
    size: tuple[int, int],
    min_area: float,
) -> dict[str, Any]:
    scores = [inst.score for inst in instances if inst.score is not None]
    prediction = {
        "model_version": version,
        "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
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
    "TINY_BANNER",
    "Output",
    "collect_images",
    "local_files_url",
    "overlay_names",
    "predict_files",
    "relative_name",
    "unsearched_folders",
    "uses_tiny_models",
]
