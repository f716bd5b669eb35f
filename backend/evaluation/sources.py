"""Ground truth from what a labelling team has: a Label Studio export or project, a COCO file.

Label Studio (JSON export, or a live project's export through the SDK):
- per task, the latest non-cancelled annotation (``ls_tasks.pick_record``; never a
  prediction); tasks without one are not scored;
- its brush, polygon and rectangle regions (an object drawn as brush and polygons counts
  once) painted with ``paint_instances`` (smaller regions on top where they overlap);
- classes: the labeling config's labels in its order when given, else the labels the
  annotations use, sorted;
- pixels no region covers (``unlabeled``): ``"background"`` (the default) scores them as a
  background class (the config's ``background`` label, else one added at index 0, which
  methods are not asked for: a method's "no class" counts as background), right when
  annotators label every object of the project's classes; ``"ignore"`` leaves them unscored
  (255), for projects where only some objects are labelled. Under ``"ignore"`` a method that
  paints everything is never penalised outside the labelled regions;
- a region that cannot be decoded fails its task (a ground truth known to be wrong is not
  scored); a region with a label outside the classes is dropped and counted in ``notes``;
- sample ids: the image path without its extension (``photos/a``), ``-<task id>`` appended
  when two tasks share one; images from ``image_dir`` (by path, then by base name) or through
  ``fetch(url, task_id)`` (the CLI passes the server's safe media fetcher for a live project).

COCO instances file: categories in id order; each image's instances painted the same way
(``unlabeled`` likewise); images from ``image_dir / file_name``.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ovss_label.converters import read_coco
from ovss_label.converters.coco import CocoImage
from ovss_label.converters.ls_project import ProjectConfig
from ovss_label.converters.ls_tasks import TaskSource, file_name, image_path, image_url, pick_record
from ovss_label.images import load_rgb
from ovss_label.ontologies import BACKGROUND, Vocabulary, is_background

from .groundtruth import GroundTruth, Sample, paint_instances
from .metrics import IGNORE_INDEX

UNLABELED = ("ignore", "background")
ImageFetch = Callable[[str, Any], NDArray[Any]]
"""(image url, task id) -> (H, W, 3) uint8 RGB."""


def label_studio_ground_truth(
    tasks: Iterable[dict[str, Any]],
    *,
    label_config: str = "",
    image_dir: Path | None = None,
    fetch: ImageFetch | None = None,
    unlabeled: str = "background",
    name: str = "label-studio",
) -> GroundTruth:
    """The accepted labels of Label Studio ``tasks`` (module docstring).

    Raises:
        ValueError: Bad ``unlabeled``, not a Label Studio export, no labelled task, or no
            way to read images (neither ``image_dir`` nor ``fetch``).
    """
    _check_unlabeled(unlabeled)
    if image_dir is None and fetch is None:
        raise ValueError("images: pass --image-dir (or a live project, read through its URL)")
    data_key, labels = None, None
    if label_config:
        config = ProjectConfig.parse(label_config, "naclip", predicting=False)
        data_key, labels = config.data_key, config.vocabulary
    tasks = list(tasks)
    reader = TaskSource(tasks, data_key=data_key)  # validates and picks records only
    chosen = [t for t in tasks if isinstance(t, dict) and pick_record(t)[0] is not None]
    if not chosen:
        raise ValueError(f"{name}: no task has a non-cancelled annotation")
    vocabulary = labels or Vocabulary.from_labels(reader.labels() or [BACKGROUND])
    truth = _classes(vocabulary, unlabeled)
    dropped: Counter[str] = Counter()
    samples = []
    for image_id, task in _task_ids(chosen, data_key):
        image = _TaskImage(partial(_task_image, task, data_key, image_dir, fetch))
        load = partial(_task_labels, task, data_key, truth.classes, truth.fill, dropped, image)
        samples.append(Sample(image_id, image.take, load))
    notes = (f"{len(chosen)} of {len(tasks)} tasks have an accepted annotation",)
    return truth.ground_truth(name, samples, notes, dropped)


def coco_ground_truth(path: Path, image_dir: Path, *, unlabeled: str = "background") -> GroundTruth:
    """The instances of a COCO file as label maps (module docstring).

    Raises:
        ValueError: Bad ``unlabeled``; the file is not COCO (``CocoError``).
    """
    _check_unlabeled(unlabeled)
    categories, images = read_coco(path)
    truth = _classes(Vocabulary.from_labels(categories), unlabeled)
    samples = [
        Sample(
            posixpath.splitext(image.file_name)[0],
            partial(load_rgb, image_dir / image.file_name),
            partial(_coco_labels, image, truth.classes, truth.fill),
        )
        for image in images
    ]
    return truth.ground_truth(f"coco:{path.name}", samples, (), Counter())


class _Classes:
    """Class order, the methods' vocabulary and the fill of unlabelled pixels."""

    def __init__(self, vocabulary: Vocabulary, unlabeled: str) -> None:
        names = vocabulary.names
        background = next((i for i, n in enumerate(names) if is_background(n)), None)
        self.vocabulary, self.class_index = vocabulary, None
        self.classes: tuple[str, ...] = names
        self.no_class = IGNORE_INDEX if background is None else background
        self.fill = IGNORE_INDEX
        if unlabeled == "background":
            if background is None:  # added at 0; methods are asked for the labels only
                self.classes = (BACKGROUND, *names)
                self.class_index = tuple(range(1, len(names) + 1))
                self.no_class = 0
            self.fill = self.no_class

    def ground_truth(
        self, name: str, samples: Sequence[Sample], notes: tuple[str, ...], dropped: Counter[str]
    ) -> GroundTruth:
        fill = "background" if self.fill != IGNORE_INDEX else "ignored (255)"
        notes = (*notes, f"pixels no region covers: {fill}")
        return GroundTruth(name, self.classes, self.vocabulary, samples, self.no_class,
                           self.class_index, "", notes, dropped)  # fmt: skip


def _classes(vocabulary: Vocabulary, unlabeled: str) -> _Classes:
    return _Classes(vocabulary, unlabeled)


def _check_unlabeled(unlabeled: str) -> None:
    if unlabeled not in UNLABELED:
        raise ValueError(f"unlabeled must be one of {', '.join(UNLABELED)}, got {unlabeled!r}")


def _task_ids(
    tasks: list[dict[str, Any]], data_key: str | None
) -> list[tuple[str, dict[str, Any]]]:
    """(image id, task): the image path without extension; ``-<task id>`` where repeated."""
    stems = []
    for position, task in enumerate(tasks, 1):
        try:
            stems.append(posixpath.splitext(image_path(image_url(task, data_key)))[0])
        except (ValueError, KeyError, TypeError):
            stems.append(f"task-{task.get('id', position)}")
    counts = Counter(stems)
    return [
        (f"{stem}-{task.get('id', position)}" if counts[stem] > 1 else stem, task)
        for position, (stem, task) in enumerate(zip(stems, tasks, strict=True), 1)
    ]


class _TaskImage:
    """A task's image, read at most once per sample: an annotation without regions (nothing
    in the image) has no size in its results, so reading its label map reads the image for
    its size and keeps it for the methods (``take``)."""

    def __init__(self, load: Callable[[], NDArray[Any]]) -> None:
        self.load = load
        self.kept: NDArray[Any] | None = None

    def size(self, task: dict[str, Any], url: str) -> tuple[int, int]:
        image = self.kept = self.load()
        return int(image.shape[1]), int(image.shape[0])

    def take(self) -> NDArray[Any]:
        image, self.kept = (self.kept if self.kept is not None else self.load()), None
        return image


def _task_labels(
    task: dict[str, Any],
    data_key: str | None,
    classes: tuple[str, ...],
    fill: int,
    dropped: Counter[str],
    image: _TaskImage,
) -> NDArray[np.uint8]:
    source = TaskSource([task], data_key=data_key, image_size=image.size)
    images = list(source.images())
    bad = [s for s in source.report.skipped if "empty region" not in s.reason]
    if bad or not images:
        reasons = "; ".join(s.reason for s in bad) or "no image"
        raise ValueError(f"annotation cannot be scored: {reasons}")
    found = images[0]
    instances = [inst for _, inst in found.regions]
    class_of = {name: i for i, name in enumerate(classes)}
    dropped.update(inst.label for inst in instances if inst.label not in class_of)
    return paint_instances(instances, class_of, found.height, found.width, fill)


def _task_image(
    task: dict[str, Any], data_key: str | None, image_dir: Path | None, fetch: ImageFetch | None
) -> NDArray[Any]:
    url = image_url(task, data_key)
    if image_dir is not None:
        for candidate in (image_dir / image_path(url), image_dir / file_name(url)):
            if candidate.is_file():
                image: NDArray[Any] = load_rgb(candidate)
                return image
        if fetch is None:
            raise ValueError(f"image {image_path(url)} not found under {image_dir}")
    assert fetch is not None
    fetched: NDArray[Any] = fetch(url, task.get("id"))
    return fetched


def _coco_labels(image: CocoImage, classes: tuple[str, ...], fill: int) -> NDArray[np.uint8]:
    class_of = {name: i for i, name in enumerate(classes)}
    return paint_instances(image.instances, class_of, image.height, image.width, fill)
