"""The standard segmentation benchmarks in their usual folder layouts, as one table of data.

Each :class:`DatasetSpec` says where a dataset's images and label files sit under its root
folder (the mmsegmentation / TCL / NACLIP conventions), how its image ids are listed, and
how raw label values become class indices in its ontology's class order (``ontologies``;
255 = ignore). ``{split}`` in a pattern is the split's folder name (ADE20K calls ``val``
``validation``) and ``{id}`` the image id, which may hold ``/`` (Cityscapes' ``<city>/<name>``).

Label files are PNGs of class indices: a palette PNG gives its palette indices (Pascal VOC's
colour maps are palette PNGs), a grayscale PNG its values; an RGB label PNG is refused. Of a
dataset's label layouts the first whose files exist is used (a converted layout first, then
the raw one, mapped as the converter maps it). Value mappings (256-entry lookup tables):

- ``reduce_zero_label`` (mmseg): 0 ("other" / unlabelled) → 255, k → k-1, 255 stays;
- ``coco_stuff_171``: COCO-Stuff's 182 raw ids (COCO category id - 1) → 171 train ids: the 11
  ids no annotation uses (:data:`COCO_STUFF_UNUSED_IDS`) → 255, the rest in increasing order
  → 0..170 (mmseg ``tools/dataset_converters/coco_stuff164k.py``);
- ``coco_object_81``: the same, then things (train id < 80) → train id + 1, stuff and raw 255
  → 0 (background), as TCL's ``convert_dataset/convert_coco_object.py`` writes its
  ``_instanceTrainIds.png`` (its ``k > 90`` test sends raw 255, unlabelled, to background too);
- ``cityscapes_19``: cityscapesScripts ``labels.py`` id → trainId (:data:`CITYSCAPES_IDS`).
"""

from __future__ import annotations

import contextlib
import difflib
import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ovss_label.converters import Instance
from ovss_label.images import load_rgb, oriented_size
from ovss_label.ontologies import load

from .groundtruth import GroundTruth, Sample, paint_instances
from .metrics import IGNORE_INDEX

COCO_STUFF_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
"""Raw COCO-Stuff ids (0-based: COCO category id - 1) of the 11 COCO category ids that no
annotation uses (12 street sign, 26 hat, 29 shoe, ... 91 hair brush)."""
COCO_STUFF_RAW_IDS, COCO_THINGS = 182, 80
"""182 raw ids; train ids 0..79 are the 80 thing classes, 80..170 the stuff classes."""
CITYSCAPES_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
"""cityscapesScripts ``labels.py``: the label ids whose trainIds are 0..18, in trainId order;
every other id has trainId 255 (ignoreInEval)."""
INSTANCES = "instances"
"""The ``values`` of a COCO instances JSON layout (painted, not looked up)."""


def _lookup_tables() -> dict[str, NDArray[np.uint8]]:
    raw = np.arange(256)
    reduced = np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)
    used = [i for i in range(COCO_STUFF_RAW_IDS) if i not in COCO_STUFF_UNUSED_IDS]
    stuff = np.full(256, IGNORE_INDEX)
    stuff[used] = np.arange(len(used))
    objects = np.where(stuff < COCO_THINGS, stuff + 1, 0)
    # Unused raw ids never occur (TCL leaves them as they are): unscored, not background.
    objects[list(COCO_STUFF_UNUSED_IDS)] = IGNORE_INDEX
    cityscapes = np.full(256, IGNORE_INDEX)
    cityscapes[list(CITYSCAPES_IDS)] = np.arange(len(CITYSCAPES_IDS))
    tables = dict(identity=raw, reduce_zero_label=reduced, coco_stuff_171=stuff)
    tables |= dict(coco_object_81=objects, cityscapes_19=cityscapes)
    return {name: table.astype(np.uint8) for name, table in tables.items()}


LOOKUPS = _lookup_tables()
"""Raw label value → class index (255 = ignore), 256 entries each (module docstring)."""
_NOTES = {
    "identity": "",
    "reduce_zero_label": "; reduce_zero_label (0 → ignore, k → k-1)",
    "coco_stuff_171": " mapped to 171 train ids",
    "coco_object_81": " mapped to 81 classes as TCL does (unlabelled → background)",
    "cityscapes_19": " mapped to 19 train ids (cityscapesScripts labels.py)",
    INSTANCES: " painted, larger instances first, on background 0; crowd regions ignored",
}


@dataclass(frozen=True)
class LabelLayout:
    """One way a dataset's labels may be stored.

    Attributes:
        pattern: The label file relative to the root, with ``{split}`` and ``{id}``; for
            ``values == INSTANCES``, the instances JSON (no ``{id}``).
        values: How raw values become class indices: a key of :data:`LOOKUPS`, or
            ``INSTANCES``.
    """

    pattern: str
    values: str


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark dataset's folder layout (module docstring).

    Attributes:
        key: The dataset name (``voc``); also its protocol key (``protocols.py``).
        title: Human-readable name.
        ontology: The ``ontologies`` name that gives the class order.
        has_background: Whether class 0 is a background class (a method's "no class").
        root: What the root folder is, for error messages.
        image: The image file relative to the root, with ``{split}`` and ``{id}``.
        labels: The label layouts, in the order they are tried.
        split_file: The file listing the ids (one a line), with ``{split}``; "" lists the
            label files of the layout found (recursively, sorted; id = path minus suffix).
        split_dirs: ``(split, folder name)`` pairs where they differ (``val`` → ``validation``).
        parent_of: A folder name: a root that holds it is taken as its parent.
    """

    key: str
    title: str
    ontology: str
    has_background: bool
    root: str
    image: str
    labels: tuple[LabelLayout, ...]
    split_file: str = ""
    split_dirs: tuple[tuple[str, str], ...] = ()
    parent_of: str = ""

    @property
    def protocol(self) -> str:
        """The key of the protocol tables: the dataset key."""
        return self.key


def _pascal(key: str, ontology: str, values: str, context: bool = False) -> DatasetSpec:
    """VOC 2012 or mmseg's Pascal Context; class 0 is background unless reduce_zero_label."""
    name, root = ("Context", "VOC2010, converted by mmseg") if context else ("VOC 2012", "VOC2012")
    suffix = "Context" if context else ""
    return DatasetSpec(
        key, f"Pascal {name}", ontology, values == "identity",
        root=f"Pascal {name} layout: VOCdevkit/{root}",
        image="JPEGImages/{id}.jpg",
        labels=(LabelLayout(f"SegmentationClass{suffix}/{{id}}.png", values),),
        split_file=f"ImageSets/Segmentation{suffix}/{{split}}.txt",
    )  # fmt: skip


_COCO_ROOT = "COCO-Stuff 164k layout: coco_stuff164k"
_STUFFTHINGMAPS = "stuffthingmaps_trainval2017/{split}2017/{id}.png"

# fmt: off
DATASETS: dict[str, DatasetSpec] = {spec.key: spec for spec in (
    _pascal("voc", "voc21", "identity"),
    _pascal("voc20", "voc20", "reduce_zero_label"),
    _pascal("context60", "context60", "identity", context=True),
    _pascal("context59", "context59", "reduce_zero_label", context=True),
    DatasetSpec(
        "coco_object", "COCO-Object", "coco_object81", has_background=True,
        root=f"{_COCO_ROOT}, or coco_object as TCL converts it",
        image="images/{split}2017/{id}.jpg",
        labels=(
            LabelLayout("annotations/{split}2017/{id}_instanceTrainIds.png", "identity"),
            LabelLayout(_STUFFTHINGMAPS, "coco_object_81"),
            LabelLayout("annotations/instances_{split}2017.json", INSTANCES),
        ),
    ),
    DatasetSpec(
        "coco_stuff", "COCO-Stuff 164k", "coco_stuff", has_background=False,
        root=_COCO_ROOT,
        image="images/{split}2017/{id}.jpg",
        labels=(
            LabelLayout("annotations/{split}2017/{id}_labelTrainIds.png", "identity"),
            LabelLayout(_STUFFTHINGMAPS, "coco_stuff_171"),
        ),
    ),
    DatasetSpec(
        "ade20k", "ADE20K", "ade20k", has_background=False,
        root="ADE20K layout: ADEChallengeData2016 (or the folder holding it)",
        image="images/{split}/{id}.jpg",
        labels=(LabelLayout("annotations/{split}/{id}.png", "reduce_zero_label"),),
        split_dirs=(("val", "validation"), ("train", "training")),
        parent_of="ADEChallengeData2016",
    ),
    DatasetSpec(
        "cityscapes", "Cityscapes", "cityscapes", has_background=False,
        root="Cityscapes layout: cityscapes, holding leftImg8bit/ and gtFine/",
        image="leftImg8bit/{split}/{id}_leftImg8bit.png",
        labels=(
            LabelLayout("gtFine/{split}/{id}_gtFine_labelTrainIds.png", "identity"),
            LabelLayout("gtFine/{split}/{id}_gtFine_labelIds.png", "cityscapes_19"),
        ),
    ),
)}
# fmt: on
"""The supported datasets by key."""


def dataset_names() -> list[str]:
    """The dataset keys, in table order."""
    return list(DATASETS)


def dataset_ground_truth(
    name: str, root: Path, split: str = "val", limit: int | None = None
) -> GroundTruth:
    """A benchmark dataset's ground truth (module docstring); images and label maps are read
    when a sample loads.

    Args:
        name: A dataset key (:func:`dataset_names`).
        root: The dataset's root folder (``DatasetSpec.root``).
        split: ``val`` (the benchmarks' split), ``train``, ...
        limit: Keep the first ``limit`` ids (quick runs).

    Raises:
        ValueError: Unknown name (the message lists the names), a missing folder or file
            (the message names the path expected and the layout), or no ids.
    """
    spec = DATASETS.get(name.strip().lower())
    if spec is None:
        close = difflib.get_close_matches(name.lower(), list(DATASETS), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}.{hint}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    root = _resolve_root(spec, Path(root))
    folder = dict(spec.split_dirs).get(split, split)
    split_file = _split_file(spec, root, folder)
    layout = _find_layout(spec, root, folder)
    if layout.values == INSTANCES:
        samples = _instance_samples(spec, root, folder, layout, limit)
    else:
        ids = _list_ids(spec, root, folder, layout, split_file)[:limit]
        samples = [_png_sample(spec, root, folder, layout, i) for i in ids]
    vocabulary = load(spec.ontology)
    return GroundTruth(
        name=spec.key,
        classes=vocabulary.names,
        vocabulary=vocabulary,
        samples=samples,
        no_class=0 if spec.has_background else IGNORE_INDEX,
        protocol=spec.protocol,
        notes=(
            f"labels: {_describe(layout, folder, '*')}{_NOTES[layout.values]}",
            f"{spec.title} {split}: {len(samples)} images from {root}",
        ),
    )


def _resolve_root(spec: DatasetSpec, root: Path) -> Path:
    if spec.parent_of and (root / spec.parent_of).is_dir():
        return root / spec.parent_of
    if not root.is_dir():
        raise ValueError(f"dataset root {root} is not a folder ({spec.root})")
    return root


def _split_file(spec: DatasetSpec, root: Path, folder: str) -> Path | None:
    """The split file (checked first: it tells a wrong root most plainly), or None."""
    if not spec.split_file:
        return None
    path = root / spec.split_file.format(split=folder)
    if not path.is_file():
        raise ValueError(f"expected {path} ({spec.root})")
    return path


def _find_layout(spec: DatasetSpec, root: Path, folder: str) -> LabelLayout:
    """The first label layout whose files exist under ``root``."""
    for layout in spec.labels:
        if layout.values == INSTANCES:
            if (root / _describe(layout, folder)).is_file():
                return layout
            continue
        prefix, suffix = _describe(layout, folder, _CUT).split(_CUT)
        # With a split file the folder is enough; without, the folder must hold this
        # layout's files (COCO's annotations/ may hold only the instances JSON).
        if (root / prefix).is_dir() and (
            spec.split_file or next((root / prefix).rglob(f"*{suffix}"), None) is not None
        ):
            return layout
    wanted = " or ".join(str(root / _describe(layout, folder)) for layout in spec.labels)
    raise ValueError(f"expected {wanted} ({spec.root})")


_CUT = "\0"  # an id that splits a label path into its folder and its file-name suffix


def _describe(layout: LabelLayout, folder: str, image_id: str = "<id>") -> str:
    """The layout's pattern for one split, ``image_id`` in place of the id."""
    return layout.pattern.format(split=folder, id=image_id)


def _list_ids(
    spec: DatasetSpec, root: Path, folder: str, layout: LabelLayout, split_file: Path | None
) -> list[str]:
    """The ids in the split file's order, or the sorted ids of the label files."""
    if split_file is not None:
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        where = str(split_file)
    else:
        prefix, suffix = _describe(layout, folder, _CUT).split(_CUT)
        labels = root / prefix
        found = (p.relative_to(labels).as_posix() for p in labels.rglob(f"*{suffix}"))
        ids = sorted(p[: len(p) - len(suffix)] for p in found)
        where = str(labels / f"**/*{suffix}")
    if not ids:
        raise ValueError(f"no image ids in {where} ({spec.root})")
    return ids


def _png_sample(
    spec: DatasetSpec, root: Path, folder: str, layout: LabelLayout, image_id: str
) -> Sample:
    image = root / spec.image.format(split=folder, id=image_id)
    label = root / _describe(layout, folder, image_id)
    truth = partial(_png_truth, label, LOOKUPS[layout.values], image)
    return Sample(image_id, partial(load_rgb, image), truth)


def _png_truth(label: Path, lookup: NDArray[np.uint8], image: Path) -> NDArray[np.uint8]:
    """(H, W) uint8 class indices of one label PNG, checked against the image's size."""
    truth: NDArray[np.uint8] = lookup[_read_indices(label)]
    _check_size(truth, label, image)
    return truth


def _read_indices(path: Path) -> NDArray[np.uint8]:
    """(H, W) uint8 raw label values: a palette PNG's indices, a grayscale PNG's values."""
    try:
        with Image.open(path) as label:
            if label.mode not in ("P", "L"):
                raise ValueError(
                    f"label map {path} is a mode {label.mode!r} image; expected class indices "
                    "(a palette or 8-bit grayscale PNG), not colours"
                )
            return np.asarray(label, dtype=np.uint8)
    except OSError as exc:
        raise ValueError(f"cannot read label map {path}: {exc}") from exc


def _check_size(truth: NDArray[Any], label: str | Path, image: Path) -> None:
    try:
        width, height = oriented_size(image)
    except OSError as exc:
        raise ValueError(f"cannot read image {image}: {exc}") from exc
    if truth.shape != (height, width):
        raise ValueError(
            f"label map {label} is {truth.shape[1]}x{truth.shape[0]} but image {image} is "
            f"{width}x{height}"
        )


def _instance_samples(
    spec: DatasetSpec, root: Path, folder: str, layout: LabelLayout, limit: int | None
) -> list[Sample]:
    """One sample per image of a COCO instances JSON, sorted by id (the file name's stem)."""
    from pycocotools.coco import COCO

    path = root / _describe(layout, folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
            coco = COCO(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read COCO instances file {path}: {exc}") from exc
    categories = sorted(coco.getCatIds())
    things = len(load(spec.ontology).names) - 1
    if len(categories) != things:
        raise ValueError(f"{path} has {len(categories)} categories; {spec.title} has {things}")
    # Category ids in increasing order are classes 1..80 (0 is background).
    class_of = {str(c): i for i, c in enumerate(categories, start=1)} | {_CROWD: IGNORE_INDEX}
    samples = []
    for record in sorted(coco.imgs.values(), key=lambda img: str(img["file_name"]))[:limit]:
        image_id = Path(record["file_name"]).stem
        image = root / spec.image.format(split=folder, id=image_id)
        truth = partial(_painted_truth, coco, record, class_of, image, path)
        samples.append(Sample(image_id, partial(load_rgb, image), truth))
    if not samples:
        raise ValueError(f"no images in {path} ({spec.root})")
    return samples


_CROWD = "\0crowd"
"""The label crowd regions are painted with (never a category id)."""


def _painted_truth(
    coco: Any, record: dict[str, Any], class_of: dict[str, int], image: Path, path: Path
) -> NDArray[np.uint8]:
    """(H, W) uint8: background 0, instances painted larger first (``paint_instances``). Crowd
    regions (``iscrowd`` 1) are 255, not scored: a crowd region covers a group of objects and
    the unlabelled gaps between them, so it is neither all the class nor background."""
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=record["id"], iscrowd=None))
    instances = [
        Instance(coco.annToMask(a), _CROWD if a.get("iscrowd") else str(a["category_id"]))
        for a in annotations
    ]
    truth = paint_instances(instances, class_of, int(record["height"]), int(record["width"]), 0)
    _check_size(truth, f"{path} image {record['id']}", image)
    return truth
