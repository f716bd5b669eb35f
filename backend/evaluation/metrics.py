"""Semantic-segmentation metrics: mmsegmentation's ``IoUMetric``, on one confusion matrix.

Follows open-mmlab/mmsegmentation 1.x ``mmseg/evaluation/metrics/iou_metric.py``
(``intersect_and_union``, ``total_area_to_metrics``), written here because mmseg 1.x no longer
installs with current mmcv:

- pixels whose ground truth is ``ignore_index`` (255) are left out, whatever was predicted;
- per class k, over the **whole dataset** (not per image): ``I_k`` = pixels labelled k and
  predicted k, ``U_k`` = pixels labelled k + pixels predicted k - ``I_k``;
- ``IoU_k = I_k / U_k`` and ``Acc_k = I_k / (pixels labelled k)``, undefined (None) where the
  denominator is zero; ``mIoU`` / ``mAcc`` are their means over the defined classes (mmseg's
  ``nanmean``), so a class absent from both ground truth and predictions everywhere drops out,
  while a class only predicted counts with IoU 0;
- ``aAcc`` = correctly predicted pixels / labelled pixels.

A prediction may say "no class" with 255: such a pixel counts in its ground-truth class's
union (a miss) and in no class's predictions (mmseg's ``histc`` over ``[0, K-1]`` drops it too).

The counts are one (K, K+1) int64 confusion matrix (rows: ground truth, columns: prediction,
the last column "no class"), accumulated with one ``bincount`` per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

IGNORE_INDEX = 255
"""Ground truth: not scored. Prediction: no class."""


class LabelMapError(ValueError):
    """A ground-truth or prediction map that cannot be scored; the message says why."""


@dataclass(frozen=True)
class Scores:
    """What one confusion matrix says (fractions in [0, 1]; None where undefined).

    Attributes:
        iou: Per class, ``I/U``; None where the union is zero.
        acc: Per class, ``I / labelled pixels``; None where the class is never labelled.
        miou: Mean of the defined ``iou`` (None when no class is defined).
        macc: Mean of the defined ``acc``.
        aacc: Correct pixels / labelled pixels (None when no pixel is labelled).
    """

    iou: tuple[float | None, ...]
    acc: tuple[float | None, ...]
    miou: float | None
    macc: float | None
    aacc: float | None


class ConfusionMatrix:
    """Pixel counts ``(ground truth, prediction)`` over a dataset (module docstring).

    Args:
        num_classes: K; class indices are 0..K-1 in the dataset's class order.
    """

    def __init__(self, num_classes: int) -> None:
        if not 0 < num_classes < IGNORE_INDEX:
            raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX - 1}, got {num_classes}")
        self.num_classes = num_classes
        self.counts: NDArray[np.int64] = np.zeros((num_classes, num_classes + 1), np.int64)

    def update(self, truth: NDArray[Any], prediction: NDArray[Any]) -> None:
        """Adds one image. ``truth`` and ``prediction``: (H, W) integer class indices, 255 for
        ignore / no class.

        Raises:
            LabelMapError: Different shapes, or a value that is neither a class nor 255.
        """
        if truth.shape != prediction.shape:
            raise LabelMapError(
                f"prediction is {_size(prediction)}, ground truth is {_size(truth)}"
            )
        k = self.num_classes
        truth, prediction = truth.ravel().astype(np.int64), prediction.ravel().astype(np.int64)
        check_label_map(truth, k, "ground truth")
        check_label_map(prediction, k, "prediction")
        scored = truth != IGNORE_INDEX
        column = np.where(prediction[scored] == IGNORE_INDEX, k, prediction[scored])
        pairs = truth[scored] * (k + 1) + column
        self.counts += np.bincount(pairs, minlength=k * (k + 1)).reshape(k, k + 1)

    def merge(self, other: ConfusionMatrix) -> None:
        """Adds another matrix's counts (e.g. from another worker)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"{other.num_classes} classes != {self.num_classes}")
        self.counts += other.counts

    def scores(self) -> Scores:
        """mmseg's ``total_area_to_metrics`` on the counts."""
        k = self.num_classes
        intersect = np.diag(self.counts[:, :k]).astype(np.float64)
        labelled = self.counts.sum(axis=1).astype(np.float64)
        predicted = self.counts[:, :k].sum(axis=0).astype(np.float64)
        union = labelled + predicted - intersect
        iou = tuple(_ratio(i, u) for i, u in zip(intersect, union, strict=True))
        acc = tuple(_ratio(i, n) for i, n in zip(intersect, labelled, strict=True))
        return Scores(iou, acc, _mean(iou), _mean(acc), _ratio(intersect.sum(), labelled.sum()))

    def normalised(self) -> NDArray[np.float64]:
        """(K, K+1) rows divided by their sums (the fraction of each class's pixels predicted
        as each class or as nothing); rows of never-labelled classes are zero."""
        rows = self.counts.sum(axis=1, keepdims=True).astype(np.float64)
        out: NDArray[np.float64] = np.zeros(self.counts.shape)
        np.divide(self.counts, rows, out=out, where=rows > 0)
        return out


def check_label_map(values: NDArray[Any], k: int, what: str) -> None:
    """Raises :class:`LabelMapError` if ``values`` holds anything but 0..k-1 and 255."""
    bad = (values < 0) | ((values >= k) & (values != IGNORE_INDEX))
    if bad.any():
        found = sorted(set(values[bad][:1000].tolist()))[:5]
        raise LabelMapError(
            f"{what} holds values {found} that are neither a class (0..{k - 1}) nor {IGNORE_INDEX}"
        )


def _size(array: NDArray[Any]) -> str:
    return "x".join(str(n) for n in reversed(array.shape)) if array.ndim == 2 else str(array.shape)


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator / denominator) if denominator > 0 else None


def _mean(values: tuple[float | None, ...]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
