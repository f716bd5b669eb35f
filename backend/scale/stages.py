"""The stages both ``predict --ray`` pipelines share: decode (a CPU task) and the proposer (an
actor); what happens to a failed image is the run's :class:`Errors` policy.

A row is a dict that grows along the pipeline: ``item`` (what a failure names: a path, a
task), then ``image`` ((H, W, 3) uint8 RGB as shown; (0, 0, 3) when it failed), ``error`` (""
or the reason) and ``transient`` (a rerun may succeed), then ``proposal`` (a pickled
``Proposal``, b"" when none: Ray Data would first try, and fail, to make it an Arrow column)
and ``score`` (``proposers/confidence.py``); past the actor, ``image`` keeps its pixels only
when a later stage draws on them (overlays): else an (H, W, 0) array, its size alone. A failed
row passes through every later stage untouched, so every image comes back to the driver
exactly once.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ovss_label.ontologies import Vocabulary

from ..predict import PREDICT_ERRORS, failure
from ..proposers import Proposal, Proposer, propose
from ..proposers.confidence import task_score
from .cluster import Pool, set_threads

NO_IMAGE = np.zeros((0, 0, 3), np.uint8)
"""The ``image`` of a row that has none (a failed decode): rows keep one schema."""


class Errors(Protocol):
    """Which exceptions fail one image (not the run), and how they are reported."""

    @property
    def catches(self) -> tuple[type[Exception], ...]: ...

    def describe(self, exc: Exception, item: str) -> tuple[str, bool]:
        """``(reason, transient)`` of ``exc`` raised for ``item``."""
        ...


@dataclass(frozen=True)
class FileErrors:
    """``predict`` over files: what ``predict_files`` skips, with the same reason; model and
    memory errors may pass (a rerun tries the image again, ``records.py``)."""

    catches: tuple[type[Exception], ...] = PREDICT_ERRORS

    def describe(self, exc: Exception, item: str) -> tuple[str, bool]:
        """The reason without the path, and whether it may pass."""
        return failure(Path(item), exc).reason, isinstance(exc, (RuntimeError, MemoryError))


@dataclass(frozen=True)
class Decode:
    """The decode task: ``load(row)`` into ``image``, a failure into ``error``."""

    load: Callable[[dict[str, Any]], NDArray[np.uint8]]
    errors: Errors

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            image = self.load(row)
        except self.errors.catches as exc:
            reason, transient = self.errors.describe(exc, row["item"])
            return {**row, "image": NO_IMAGE, "error": reason, "transient": transient}
        return {**row, "image": image, "error": "", "transient": False}


def load_file(row: dict[str, Any]) -> NDArray[np.uint8]:
    """The image file ``row["item"]`` (``images.load_rgb``: EXIF orientation applied)."""
    from ovss_label.images import load_rgb

    image: NDArray[np.uint8] = load_rgb(Path(row["item"]))
    return image


class ProposeActor:
    """The model stage: one proposer per actor, built once by ``build(device)``.

    Args:
        build: Makes the proposer on a device (picklable: it travels to the actor).
        version: The driver's ``model_version``: an actor whose proposer has another one
            (another weight file on that node) refuses to start.
        vocabulary: What is proposed.
        errors: The run's failure policy.
        pool: The pool's device and threads.
        pixels: Pass the image's pixels on (overlays), not only its size.
    """

    def __init__(
        self,
        build: Callable[[str], Proposer],
        version: str,
        vocabulary: Vocabulary,
        errors: Errors,
        pool: Pool,
        pixels: bool = False,
    ) -> None:
        set_threads(pool)
        self.proposer = build(pool.device)
        if self.proposer.model_version != version:
            raise RuntimeError(
                f"this Ray worker's model is {self.proposer.model_version}, the driver's "
                f"{version}: every node needs the same weight files at the same paths"
            )
        self.vocabulary, self.errors, self.pixels = vocabulary, errors, pixels

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        proposal, score = b"", 0.0
        if not row["error"]:
            try:
                found = propose(self.proposer, row["image"], self.vocabulary, None)
                score = task_score(found, self.proposer.calibration)
                proposal = pickle.dumps(found, protocol=pickle.HIGHEST_PROTOCOL)
            except self.errors.catches as exc:
                reason, transient = self.errors.describe(exc, row["item"])
                row = {**row, "error": reason, "transient": transient}
        image = row["image"] if self.pixels else size_only(row["image"])
        return {**row, "image": image, "proposal": proposal, "score": score}


def size_only(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """An (H, W, 0) uint8 array: ``image``'s size without its pixels (nothing to copy)."""
    return np.empty((*image.shape[:2], 0), np.uint8)


def proposal_of(row: dict[str, Any]) -> Proposal:
    """The ``Proposal`` an actor put in ``row`` (post-processing tasks)."""
    proposal: Proposal = pickle.loads(row["proposal"])  # from our own actor, not from a user
    return proposal
