"""What every ground-truth source gives the evaluation: class order, samples, and how a
method's output maps onto the classes.

A source (a standard dataset layout ``datasets.py``; a Label Studio export or project, a COCO
file ``sources.py``) is read into one :class:`GroundTruth`: the classes in index order, the
vocabulary the methods are asked to segment, and samples that load an image and its label map
on demand (a dataset's maps need not fit in memory together).

Label maps are (H, W) uint8 class indices in the source's class order; 255 (``IGNORE_INDEX``)
marks pixels that are not scored. Instances become a label map with :func:`paint_instances`:
larger instances are painted first, so where two overlap the smaller one keeps the pixels (an
object lying on another stays visible; the same rule for COCO files, COCO-Object instances and
overlapping Label Studio regions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ovss_label.converters import Instance
from ovss_label.ontologies import Vocabulary

from .metrics import IGNORE_INDEX


@dataclass(frozen=True)
class Sample:
    """One scored image.

    Attributes:
        id: The image id; names its prediction file ``<id>.png`` (may hold ``/``: Cityscapes'
            ``<city>/<name>``).
        load_image: Returns the (H, W, 3) uint8 RGB image, EXIF orientation applied.
        load_truth: Returns the (H, W) uint8 label map (class indices, 255 = ignore).
    """

    id: str
    load_image: Callable[[], NDArray[Any]]
    load_truth: Callable[[], NDArray[Any]]


@dataclass(frozen=True)
class GroundTruth:
    """A labelled image set in one class order.

    Attributes:
        name: What it is, for reports (``voc``, ``ls-export``, ``coco``).
        classes: Class names in index order (label-map values 0..K-1).
        vocabulary: What a method is asked to segment. Its class ``i`` is ``classes[
            class_index[i]]``; a project scored with ``--unlabeled background`` asks for its
            labels only and counts a method's "no class" as the background class.
        class_index: Per vocabulary class, its index in ``classes`` (identity when None).
        no_class: The label a method's "no class" pixel gets: the background class's index
            when ``classes`` has one, else 255 (a miss for the pixel's true class).
        samples: The images, in a fixed order.
        protocol: The dataset key of the protocol tables (``protocols.py``); "" for a
            project's own labels (each method's defaults).
        notes: How the ground truth was derived (printed with the results).
        dropped: Labels met while loading samples that are not classes, with region counts
            (filled as samples load; reported after the run).
    """

    name: str
    classes: tuple[str, ...]
    vocabulary: Vocabulary
    samples: Sequence[Sample]
    no_class: int = IGNORE_INDEX
    class_index: tuple[int, ...] | None = None
    protocol: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    dropped: Counter[str] = field(default_factory=Counter, compare=False)

    def __post_init__(self) -> None:
        k = len(self.classes)
        if not 0 < k < IGNORE_INDEX:
            raise ValueError(f"{self.name}: {k} classes; 1..{IGNORE_INDEX - 1} can be scored")
        index = self.vocabulary_classes()
        if len(index) != len(self.vocabulary.names) or not all(0 <= i < k for i in index):
            raise ValueError(f"{self.name}: class_index does not fit {k} classes")
        if self.no_class != IGNORE_INDEX and not 0 <= self.no_class < k:
            raise ValueError(f"{self.name}: no_class {self.no_class} is not a class")

    def vocabulary_classes(self) -> tuple[int, ...]:
        """Per vocabulary class, its index in ``classes``."""
        if self.class_index is None:
            return tuple(range(len(self.vocabulary.names)))
        return self.class_index

    def to_labels(self, assignment: NDArray[Any]) -> NDArray[np.uint8]:
        """A method's (H, W) vocabulary indices (-1: no class) as a label map."""
        lut = np.array([*self.vocabulary_classes(), self.no_class], dtype=np.uint8)
        labels: NDArray[np.uint8] = lut[np.where(assignment < 0, len(lut) - 1, assignment)]
        return labels


def paint_instances(
    instances: Iterable[Instance],
    class_of: Mapping[str, int],
    height: int,
    width: int,
    fill: int = IGNORE_INDEX,
) -> NDArray[np.uint8]:
    """A (height, width) uint8 label map of ``instances`` (module docstring: larger first, so
    smaller ones keep overlapping pixels; equal areas keep their given order). Pixels no
    instance covers get ``fill``; an instance whose label is not in ``class_of`` is skipped
    (the caller reports it)."""
    labels = np.full((height, width), fill, np.uint8)
    known = [inst for inst in instances if inst.label in class_of]
    for inst in sorted(known, key=lambda inst: -int(np.count_nonzero(inst.mask))):
        if inst.mask.shape != labels.shape:
            raise ValueError(
                f"{inst.label!r} mask is {inst.mask.shape[1]}x{inst.mask.shape[0]}, "
                f"image is {width}x{height}"
            )
        labels[inst.mask] = class_of[inst.label]
    return labels
