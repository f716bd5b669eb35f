"""Score maps -> instances an annotator can accept or delete one by one.

Policy (segment_anything ``automatic_mask_generator.py`` keeps policy apart from models):

1. **Decision per pixel**: the method's ``assignment`` when it made one (NACLIP's argmax with
   ``prob_thd``), otherwise argmax over classes where the best score reaches ``threshold``.
   One class per pixel, so dense instances never overlap.
2. **Split**: ``"components"`` gives one instance per 8-connected part of a class (a stray blob
   can be deleted without touching the object); ``"class"`` gives one instance per class.
3. **Filter**: parts smaller than ``min_area`` (a fraction of the image area, at least one
   pixel) are dropped; background classes never become instances.
4. **Holes are kept**: masks are exact (brush RLE and COCO RLE keep holes; polygons get outer
   rings, see the converters).
5. **Score** of an instance: the mean of its class's score over its pixels.

Instances a method drew itself (SAM) are resolved by score: higher-scoring instances keep
contested pixels, and what a lower one keeps must still pass ``min_area``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from ovss_label.converters import Instance

from .base import BACKGROUND, Proposal


@dataclass(frozen=True)
class PostprocessConfig:
    """See the module docstring."""

    threshold: float = 0.5
    min_area: float = 0.001
    split: str = "components"


def assignment_of(proposal: Proposal, threshold: float) -> NDArray[Any]:
    """(H, W) int16 class index per pixel, -1 for none (step 1)."""
    if proposal.assignment is not None:
        given: NDArray[Any] = proposal.assignment
        return given
    best: NDArray[Any] = proposal.scores.argmax(axis=0).astype(np.int16)
    best[proposal.scores.max(axis=0) < threshold] = -1
    return best


def proposal_to_instances(proposal: Proposal, config: PostprocessConfig) -> list[Instance]:
    """Instances of one proposal, sorted by score (highest first)."""
    if config.split not in ("components", "class"):
        raise ValueError(f"split must be 'components' or 'class', got {config.split!r}")
    h, w = proposal.scores.shape[1:]
    min_pixels = max(1, int(np.ceil(config.min_area * h * w)))
    if proposal.instances is not None:
        return resolve_overlaps(proposal.instances, min_pixels)
    labels = assignment_of(proposal, config.threshold)
    found: list[Instance] = []
    for k, name in enumerate(proposal.labels):
        if name.lower() == BACKGROUND:
            continue
        mask = labels == k
        if not mask.any():
            continue
        for part in _parts(mask, config.split):
            if np.count_nonzero(part) >= min_pixels:
                score = float(proposal.scores[k][part].mean())
                found.append(Instance(part, name, score))
    return sorted(found, key=lambda inst: -(inst.score or 0.0))


def _parts(mask: NDArray[Any], split: str) -> list[NDArray[Any]]:
    if split == "class":
        return [mask]
    count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [components == i for i in range(1, count)]


def resolve_overlaps(instances: list[Instance], min_pixels: int) -> list[Instance]:
    """Higher scores keep contested pixels; remainders below ``min_pixels`` are dropped."""
    ordered = sorted(instances, key=lambda inst: -(inst.score or 0.0))
    if not ordered:
        return []
    taken = np.zeros_like(ordered[0].mask)
    kept = []
    for inst in ordered:
        if inst.label.lower() == BACKGROUND:
            continue
        mask = inst.mask & ~taken
        if np.count_nonzero(mask) >= min_pixels:
            kept.append(Instance(mask, inst.label, inst.score))
            taken |= mask
    return kept
