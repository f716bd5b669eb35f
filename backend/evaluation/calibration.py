"""How often a method's pixels are right at each confidence: the reliability histogram that a
learning job turns into the ``calibration.json`` of a trained version (``proposers/confidence.py``).

Per scored image: the method's per-pixel confidence (``Proposal.top_confidence``), whether its
label equals the ground truth, on the labelled pixels only (ground truth 255 is not scored, as
in ``metrics.py``). Pixels fall in :data:`BINS` equal-width bins of confidence; per bin, its
pixels, the right ones and the sum of confidences. Expected calibration error (Guo et al.,
"On Calibration of Modern Neural Networks", ICML 2017, eq. 3) is read off the same bins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..proposers.confidence import Calibration, fit_calibration
from .metrics import IGNORE_INDEX

BINS = 20
"""Equal-width confidence bins [choose: Guo et al. use 15; 20 keeps 0.05 steps]."""


@dataclass
class Reliability:
    """Counts per confidence bin over the scored images.

    Attributes:
        pixels: (BINS,) int64 labelled pixels per bin.
        correct: (BINS,) int64 of them whose predicted label was right.
        confidence: (BINS,) float64 sum of their confidences.
        images: Images counted.
    """

    pixels: NDArray[np.int64] = field(default_factory=lambda: np.zeros(BINS, np.int64))
    correct: NDArray[np.int64] = field(default_factory=lambda: np.zeros(BINS, np.int64))
    confidence: NDArray[np.float64] = field(default_factory=lambda: np.zeros(BINS, np.float64))
    images: int = 0

    def update(
        self, confidence: NDArray[Any], truth: NDArray[Any], prediction: NDArray[Any]
    ) -> None:
        """Adds one image: ``confidence`` (H, W) in [0, 1], ``truth`` and ``prediction``
        (H, W) class indices (255: not labelled / no prediction)."""
        if confidence.shape != truth.shape or truth.shape != prediction.shape:
            raise ValueError(
                f"confidence {confidence.shape}, truth {truth.shape} and prediction "
                f"{prediction.shape} must have one shape"
            )
        scored = truth != IGNORE_INDEX
        values = np.clip(confidence[scored].astype(np.float64), 0.0, 1.0)
        right = (prediction[scored] == truth[scored]).astype(np.int64)
        bins = np.minimum((values * BINS).astype(np.int64), BINS - 1)
        self.pixels += np.bincount(bins, minlength=BINS)
        self.correct += np.bincount(bins, right, minlength=BINS).astype(np.int64)
        self.confidence += np.bincount(bins, values, minlength=BINS)
        self.images += 1

    def accuracy(self) -> NDArray[np.float64]:
        """(BINS,) fraction right per bin; NaN for an empty bin."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.correct / self.pixels

    def mean_confidence(self) -> NDArray[np.float64]:
        """(BINS,) mean confidence per bin; NaN for an empty bin."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.confidence / self.pixels

    def ece(self) -> float | None:
        """Expected calibration error: sum over bins of |accuracy - confidence| weighted by
        the bin's share of pixels; None with no pixel."""
        total = int(self.pixels.sum())
        if total == 0:
            return None
        used = self.pixels > 0
        gaps = np.abs(self.accuracy()[used] - self.mean_confidence()[used])
        return float((gaps * self.pixels[used]).sum() / total)

    def fit(self) -> Calibration:
        """The isotonic map of ``confidence.py`` fitted on these bins.

        Raises:
            ValueError: No labelled pixel was counted.
        """
        return fit_calibration(self.mean_confidence(), self.accuracy(), self.pixels,
                               self.images)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """``eval --json``'s ``reliability`` block of a method."""
        return {"bins": BINS, "images": self.images, "pixels": self.pixels.tolist(),
                "correct": self.correct.tolist(), "confidence": self.confidence.tolist(),
                "ece": self.ece()}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> Reliability:
        """Reads :meth:`to_json`'s block.

        Raises:
            ValueError: Not such a block, or another bin count.
        """
        try:
            if int(data["bins"]) != BINS:
                raise ValueError(f"{data['bins']} bins, expected {BINS}")
            found = cls(np.array(data["pixels"], np.int64), np.array(data["correct"], np.int64),
                        np.array(data["confidence"], np.float64), int(data["images"]))  # fmt: skip
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a reliability block: {err}") from err
        if any(a.shape != (BINS,) for a in (found.pixels, found.correct, found.confidence)):
            raise ValueError(f"a reliability block has {BINS} values per list")
        return found
