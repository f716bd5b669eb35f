"""The ``eval`` job (``jobs.py`` shape): every sample through every predictor, one confusion
matrix per predictor, one report.

Per sample: the label map is read once and the image once (only when a predictor needs it).
A sample whose image or label map cannot be read, or whose sizes differ, is left out for every
method (reported), so methods are always compared on the same images. A method that fails on
one image is scored there as predicting nothing (every pixel 255: a miss), reported with its
reason, and the other methods still run: a method is never rewarded for failing.
Resuming is per method: ``SavingPredictor`` reuses saved label maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..jobs import JobReport, NoProgress, Progress
from .calibration import Reliability
from .groundtruth import GroundTruth, Sample
from .metrics import IGNORE_INDEX, ConfusionMatrix, check_label_map
from .predictions import Predictor

READ_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)
"""What reading a sample or predicting may raise for one image (PIL's decode errors are
OSErrors); anything else is a bug and stops the job."""


@dataclass
class MethodResult:
    """One predictor's counts over the scored images."""

    name: str
    model_version: str
    matrix: ConfusionMatrix
    images: int = 0
    failed: int = 0
    reliability: Reliability | None = None
    """Confidence against correctness, for predictors that report a confidence (methods)."""


@dataclass
class EvalResult:
    """What ``run_eval`` measured (``report.py`` turns it into a table, JSON and charts)."""

    dataset: str
    protocol: str
    classes: tuple[str, ...]
    methods: dict[str, MethodResult]
    images: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def run_eval(
    truth: GroundTruth,
    predictors: Sequence[Predictor],
    *,
    protocol: str = "",
    progress: Progress | None = None,
) -> JobReport:
    """Scores every predictor on every sample of ``truth``; ``report.result`` is the
    :class:`EvalResult`, ``report.failed`` the images and (image, method) pairs that failed."""
    if not predictors:
        raise ValueError("nothing to evaluate: give a method or a predictions folder")
    names = [p.name for p in predictors]
    if len(set(names)) != len(names):
        raise ValueError(f"two predictors share a name: {names}")
    k = len(truth.classes)
    results = {
        p.name: MethodResult(p.name, p.model_version, ConfusionMatrix(k)) for p in predictors
    }
    versions = ", ".join(sorted({p.model_version for p in predictors}))
    report = JobReport(f"eval {truth.name}", versions)
    progress = progress or NoProgress()
    progress.total(len(truth.samples))
    for sample in truth.samples:
        _score_sample(sample, k, predictors, results, report)
        progress.advance(sample.id)
    report.result = EvalResult(truth.name, protocol, truth.classes, results, report.done,
                               truth.notes)  # fmt: skip
    return report


def _score_sample(
    sample: Sample,
    k: int,
    predictors: Sequence[Predictor],
    results: dict[str, MethodResult],
    report: JobReport,
) -> None:
    try:
        labels = sample.load_truth()
        check_label_map(labels, k, "ground truth")
        image = sample.load_image() if any(p.needs_image(sample) for p in predictors) else None
        _check_sizes(labels, image)
    except READ_ERRORS as exc:
        report.failed.append((sample.id, str(exc) or type(exc).__name__))
        return
    report.done += 1
    for predictor in predictors:
        result = results[predictor.name]
        try:
            prediction = predictor.predict(sample, image)
            result.matrix.update(labels, prediction)
            _count_confidence(result, predictor, labels, prediction)
        except READ_ERRORS as exc:
            _failed(result, labels, report, sample.id, exc)
        result.images += 1


def _count_confidence(
    result: MethodResult, predictor: Predictor, labels: NDArray[Any], prediction: NDArray[Any]
) -> None:
    """Adds the image to the method's reliability histogram when it gave a confidence."""
    confidence = getattr(predictor, "last_confidence", None)
    if confidence is None:
        return
    if result.reliability is None:
        result.reliability = Reliability()
    result.reliability.update(confidence, labels, prediction)


def _failed(
    result: MethodResult, labels: NDArray[Any], report: JobReport, item: str, exc: Exception
) -> None:
    """Scores the image as "no prediction" for this method and reports why."""
    result.matrix.update(labels, np.full(labels.shape, IGNORE_INDEX, np.uint8))
    result.failed += 1
    report.failed.append((f"{item} [{result.name}]", str(exc) or type(exc).__name__))


def _check_sizes(labels: NDArray[Any], image: NDArray[Any] | None) -> None:
    if labels.ndim != 2:
        raise ValueError(f"label map must be (H, W), got {labels.shape}")
    if image is not None and image.shape[:2] != labels.shape:
        raise ValueError(
            f"image is {image.shape[1]}x{image.shape[0]}, its label map "
            f"{labels.shape[1]}x{labels.shape[0]}"
        )
