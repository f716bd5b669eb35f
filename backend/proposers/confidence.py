"""A prediction's ``score``: how much of the image the model expects to have labelled right.

What Label Studio does with it: "Uncertainty sampling" serves the task whose prediction (of the
project's ``model_version``) has the lowest score first (``projects/functions/next_task.py``),
and the Data Manager sorts by it. So the score must rank images by how likely the proposal is
to be right, and a score of 0.8 should mean "about 80% of the pixels are right".

- **Raw** (zero-shot methods before a project's first training job, ``predict`` on folders):
  the mean over the image's pixels of the method's confidence in its own decision,
  ``Proposal.top_confidence()`` (the winning class's probability, a hidden background class
  included). Softmax probabilities of zero-shot models are not calibrated (NACLIP's logit
  scale of 40 makes them over-confident), so a raw score ranks images but its value is not a
  frequency.
- **Calibrated** (trained versions, and a project's zero-shot method once a job has measured
  it: ``learning/calibrations.py``): each continuous-learning job measures, on its held-out
  tasks, how often a pixel's label is right at each raw confidence (a reliability histogram of
  20 bins, ``evaluation/calibration.py``) and fits a non-decreasing map from confidence to
  accuracy: isotonic regression (Zadrozny & Elkan 2002, scipy's ``isotonic_regression``) on
  the bins, weighted by their pixels. The map is saved beside the head as ``calibration.json``
  (a zero-shot method's in the project's folder) and applied per pixel before the mean. A
  non-decreasing map keeps the order of pixels; the score becomes the expected fraction of
  correctly labelled pixels, as measured on held-out annotations of the same project.

Both are in [0, 1]; a failed prediction (no image, a model error) scores 0, so it is the first
one a person looks at.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .base import Proposal

FORMAT = "ovss-calibration/1"
FILE_NAME = "calibration.json"
"""Beside ``head.safetensors`` in a run or version folder."""


@dataclass(frozen=True)
class Calibration:
    """A non-decreasing map from raw confidence to the probability a pixel is right.

    Attributes:
        knots: Raw confidences (increasing; each a bin's mean confidence).
        accuracy: The fitted accuracy at each knot (non-decreasing, in [0, 1]); between knots
            linear, beyond the ends constant.
        pixels: Labelled pixels it was fitted on.
        images: Images it was fitted on.
    """

    knots: tuple[float, ...]
    accuracy: tuple[float, ...]
    pixels: int = 0
    images: int = 0

    def __post_init__(self) -> None:
        if not self.knots or len(self.knots) != len(self.accuracy):
            raise ValueError("a calibration needs as many knots as accuracies, at least one")
        if any(b <= a for a, b in zip(self.knots, self.knots[1:], strict=False)):
            raise ValueError("calibration knots must increase")
        if any(b < a for a, b in zip(self.accuracy, self.accuracy[1:], strict=False)):
            raise ValueError("calibrated accuracies must not decrease")
        if not all(0.0 <= v <= 1.0 for v in (*self.knots, *self.accuracy)):
            raise ValueError("calibration values must lie in [0, 1]")

    def __call__(self, confidence: NDArray[Any]) -> NDArray[np.float64]:
        """The calibrated probability of each raw ``confidence`` (any shape)."""
        return np.asarray(np.interp(confidence, self.knots, self.accuracy), np.float64)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "knots": list(self.knots), "accuracy": list(self.accuracy),
                "pixels": self.pixels, "images": self.images}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> Calibration:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a calibration ({FORMAT})")
        return cls(tuple(map(float, data["knots"])), tuple(map(float, data["accuracy"])),
                   int(data.get("pixels", 0)), int(data.get("images", 0)))  # fmt: skip


def fit_calibration(
    confidence: Sequence[float] | NDArray[Any],
    accuracy: Sequence[float] | NDArray[Any],
    pixels: Sequence[int] | NDArray[Any],
    images: int = 0,
) -> Calibration:
    """Isotonic regression of per-bin ``accuracy`` on per-bin mean ``confidence``, weighted by
    the bins' ``pixels`` (empty bins are left out). Equal fitted values of neighbouring bins
    are one flat stretch: their first and last knots are kept, so the map stays exact there.

    Raises:
        ValueError: No pixel in any bin.
    """
    from scipy.optimize import isotonic_regression

    kept = [(c, a, n) for c, a, n in zip(confidence, accuracy, pixels, strict=True) if n > 0]
    if not kept:
        raise ValueError("no labelled pixel to calibrate on")
    kept.sort()
    knots = np.array([c for c, _, _ in kept], np.float64)
    weights = np.array([n for _, _, n in kept], np.float64)
    fitted = isotonic_regression([a for _, a, _ in kept], weights=weights).x
    knots, fitted = _merge_equal_knots(knots, fitted, weights)
    values = np.clip(fitted, 0.0, 1.0)
    return Calibration(tuple(float(k) for k in knots), tuple(float(v) for v in values),
                       int(weights.sum()), images)  # fmt: skip


def _merge_equal_knots(
    knots: NDArray[np.float64], fitted: NDArray[np.float64], weights: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Knots must increase: bins with the same mean confidence (rare: float ties) become one,
    their fitted values averaged by weight."""
    unique, inverse = np.unique(knots, return_inverse=True)
    if len(unique) == len(knots):
        return knots, fitted
    values = np.bincount(inverse, fitted * weights) / np.bincount(inverse, weights)
    return unique, np.maximum.accumulate(values)


def read_calibration(folder: Path) -> Calibration | None:
    """``folder/calibration.json``, or None when there is none (a head trained by hand).

    Raises:
        ValueError: A file that is not a calibration (named).
    """
    path = folder / FILE_NAME
    if not path.is_file():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err


def task_score(proposal: Proposal, calibration: Calibration | None = None) -> float:
    """The prediction's ``score`` (module docstring): the mean per-pixel confidence, through
    ``calibration`` when given; 0 for an image without pixels."""
    confidence = proposal.top_confidence()
    if confidence.size == 0:
        return 0.0
    if calibration is not None:
        return float(calibration(confidence).mean())
    return float(confidence.mean(dtype=np.float64))
