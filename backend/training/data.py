"""Training data for the alignment module: one format for every source.

A training set is a folder written once and reused (epochs never decode an image or run the
backbone again):

- ``manifest.json``: ``{"classes", "backbone", "short_side", "items": [{"id", "feature_key",
  "grid": [gh, gw], "image_hw": [H, W]}], "digest"}``; ``digest`` hashes everything the
  training depends on (classes, backbone fingerprint, short side, each item's features and
  labels), so a checkpoint records the exact data it saw;
- ``labels/<id>.png``: the (gh, gw) patch labels, uint8 class indices, 255 = ignored;
- ``truth/<id>.png``: the full-resolution label map, for scoring held-out images;
- the backbone's patch tokens live in the feature store (``features.FeatureStore``), keyed by
  image hash, backbone fingerprint and short side.

**Patch labels** [choose, docs/algorithms.md §3.4: "down-sampling rule unspecified"]: each
patch is a cell of the label map (the network input is the image resized so both sides are
multiples of 14; a cell is the matching rectangle of the original label map), and takes the
class most of its labelled pixels carry; a patch with no labelled pixel (all 255) is ignored.
The counts come from ``cv2.resize(INTER_AREA)`` of each class's mask, i.e. the fraction of the
cell the class covers.

**Sources** are the evaluation harness's ground truth (``evaluation.groundtruth.GroundTruth``):
a Label Studio export or project, a dataset split, or stage-1 pseudo-labels written by
``clip_sam`` into the evaluation's prediction format (``pseudo_labels``), so all three give the
same label maps and class orders as ``eval`` scores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from ovss_label.converters import write_bytes_atomic

from ..evaluation.groundtruth import GroundTruth
from ..evaluation.metrics import IGNORE_INDEX
from ..jobs import JobReport, NoProgress, Progress

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TrainItem:
    """One image of a training set: where its features and patch labels are."""

    id: str
    feature_key: str
    grid: tuple[int, int]
    image_hw: tuple[int, int]


@dataclass(frozen=True)
class TrainingSet:
    """A written training set (module docstring)."""

    root: Path
    classes: tuple[str, ...]
    backbone: str
    short_side: int
    items: tuple[TrainItem, ...]
    digest: str

    def labels(self, item: TrainItem) -> NDArray[np.uint8]:
        """(gh, gw) uint8 patch labels of ``item`` (255 = ignored)."""
        return _read_png(self.root / "labels" / f"{_file_id(item.id)}.png")

    def truth(self, item: TrainItem) -> NDArray[np.uint8]:
        """(H, W) uint8 label map of ``item`` at the image's size (255 = ignored)."""
        return _read_png(self.root / "truth" / f"{_file_id(item.id)}.png")

    @classmethod
    def read(cls, root: Path) -> TrainingSet:
        """Reads a training set folder.

        Raises:
            ValueError: No manifest, or not one of ours.
        """
        path = root / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            items = tuple(
                TrainItem(i["id"], i["feature_key"], tuple(i["grid"]), tuple(i["image_hw"]))
                for i in data["items"]
            )
            return cls(root, tuple(data["classes"]), data["backbone"], int(data["short_side"]),
                       items, data["digest"])  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a training set ({err})") from err


def patch_labels(
    labels: NDArray[Any], grid: tuple[int, int], num_classes: int
) -> NDArray[np.uint8]:
    """(gh, gw) uint8 patch labels from an (H, W) label map (module docstring: majority of
    the labelled pixels of each cell; 255 where a cell has none)."""
    gh, gw = grid
    best = np.zeros((gh, gw), np.float32)
    out = np.full((gh, gw), IGNORE_INDEX, np.uint8)
    for k in np.unique(labels):
        if k == IGNORE_INDEX:
            continue
        if k >= num_classes:
            raise ValueError(f"label map holds {k}, not a class of {num_classes}")
        share = cv2.resize((labels == k).astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
        wins = share > best  # ties keep the lower class index, as argmax does
        out[wins], best[wins] = k, share[wins]
    return out


def build_training_set(
    truth: GroundTruth,
    root: Path,
    features: Any,
    *,
    progress: Progress | None = None,
) -> tuple[TrainingSet, JobReport]:
    """Writes (or completes) the training set of ``truth`` under ``root``.

    ``features`` computes and stores each image's patch tokens (``FeatureBuilder``: ``key``,
    ``grid`` and ``ensure(image) -> key``); an image whose labels or features already exist
    is not read again (a rerun resumes). Images that cannot be read are reported and left out.
    """
    report = JobReport(f"features {truth.name}", features.backbone)
    progress = progress or NoProgress()
    progress.total(len(truth.samples))
    for folder in ("labels", "truth"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    known = _known_items(root)
    items: list[TrainItem] = []
    for sample in truth.samples:
        item = known.get(sample.id)
        if item is not None and features.has(item.feature_key):
            items.append(item)
            report.skipped += 1
        else:
            try:
                items.append(_item(sample, truth, root, features))
                report.done += 1
            except (ValueError, OSError, RuntimeError, MemoryError) as exc:
                report.failed.append((sample.id, str(exc) or type(exc).__name__))
        progress.advance(sample.id)
    if not items:
        raise ValueError(f"{truth.name}: no image could be used for training")
    dataset = _write_manifest(root, truth.classes, features, items)
    report.outputs["training set"] = root
    return dataset, report


def _item(sample: Any, truth: GroundTruth, root: Path, features: Any) -> TrainItem:
    labels = sample.load_truth()
    image = sample.load_image()
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, labels {labels.shape}")
    key, grid = features.ensure(image)
    patches = patch_labels(labels, grid, len(truth.classes))
    _write_png(root / "truth" / f"{_file_id(sample.id)}.png", labels.astype(np.uint8))
    _write_png(root / "labels" / f"{_file_id(sample.id)}.png", patches)
    return TrainItem(sample.id, key, grid, (int(labels.shape[0]), int(labels.shape[1])))


def _known_items(root: Path) -> dict[str, TrainItem]:
    try:
        dataset = TrainingSet.read(root)
    except ValueError:
        return {}
    return {i.id: i for i in dataset.items if (root / "labels" / f"{_file_id(i.id)}.png").exists()}


def _write_manifest(
    root: Path, classes: tuple[str, ...], features: Any, items: list[TrainItem]
) -> TrainingSet:
    digest = hashlib.sha256()
    digest.update(json.dumps([list(classes), features.backbone, features.short_side]).encode())
    for item in items:
        digest.update(item.feature_key.encode())
        digest.update((root / "labels" / f"{_file_id(item.id)}.png").read_bytes())
    data = {
        "classes": list(classes),
        "backbone": features.backbone,
        "short_side": features.short_side,
        "items": [
            {
                "id": i.id,
                "feature_key": i.feature_key,
                "grid": list(i.grid),
                "image_hw": list(i.image_hw),
            }
            for i in items
        ],
        "digest": digest.hexdigest()[:16],
    }
    write_bytes_atomic(root / MANIFEST, (json.dumps(data, indent=1) + "\n").encode())
    return TrainingSet.read(root)


def split_items(
    items: tuple[TrainItem, ...], held_out: float
) -> tuple[list[TrainItem], list[TrainItem]]:
    """(train, held out): an item is held out when the hash of its id falls below
    ``held_out`` (a sticky rule: an item's side never changes as the set grows); at least one
    item on each side when there are two or more."""

    def position(item: TrainItem) -> float:
        return int(hashlib.sha256(item.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    ranked = sorted(items, key=position)
    held = [i for i in ranked if position(i) < held_out]
    if len(items) >= 2 and held_out > 0 and not held:
        held = ranked[:1]
    if len(held) == len(items) and len(items) >= 2:
        held = held[:-1]
    train = [i for i in items if i not in held]
    return train, held


def class_prototypes(text: Any, vocabulary: Any) -> torch.Tensor:
    """(K, D) unit text prototypes: per class, the mean of its synonyms' unit embeddings,
    normalised [choose: one vector per class is what the loss needs; NACLIP takes the max over
    synonyms at scoring time instead]. ``text`` is a ``TextEncoder`` (``query_features``)."""
    queries, query_idx = text.query_features(vocabulary)
    index = torch.tensor(query_idx)
    k = len(vocabulary.names)
    sums = torch.zeros(k, queries.shape[1]).index_add_(0, index, queries.float().cpu())
    return torch.nn.functional.normalize(sums, dim=-1)


def _file_id(image_id: str) -> str:
    """A flat file name for an id that may hold ``/`` (kept readable, made unique by a hash)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)[-80:]
    return f"{safe}-{hashlib.sha1(image_id.encode()).hexdigest()[:8]}"


def _read_png(path: Path) -> NDArray[np.uint8]:
    with Image.open(path) as png:
        return np.array(png, dtype=np.uint8)


def _write_png(path: Path, labels: NDArray[np.uint8]) -> None:
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(labels, mode="L").save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
