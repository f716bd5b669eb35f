"""Score maps -> instances an annotator can accept or delete one by one.

Policy (segment_anything ``automatic_mask_generator.py`` keeps policy apart from models):

1. **Decision per pixel**: the method's ``assignment`` when it made one (NACLIP's argmax with
   ``prob_thd``), otherwise argmax over classes where the best score reaches ``threshold``.
   One class per pixel, so dense instances never overlap.
2. **Split**: ``"components"`` gives one instance per part of a class (a stray blob can be
   deleted without touching the object); ``"class"`` gives one instance per class. A part is
   8-connected: pixels touching only at a corner are one object. This is the converters' one
   connectivity (``converters.instance.PART_CONNECTIVITY``), which polygon parts use too, so
   each split instance becomes exactly one polygon region.
3. **Filter**: parts with fewer pixels than ``min_area`` (a fraction of the image area) are
   dropped; ``converters.instance.min_area_pixels`` converts it (``ceil(min_area * H * W)``, at
   least one pixel), and passing the same fraction to ``instances_to_results`` as
   ``min_area_fraction`` applies it to each polygon part as well (a ``"class"`` instance or a
   method's own mask can hold smaller parts). Background classes never become instances.
4. **Holes are kept**: masks are exact (brush RLE and COCO RLE keep holes; polygons get outer
   rings, see the converters).
5. **Score** of an instance: the mean of its class's score over its pixels.
6. **Score floor**: instances scoring below ``min_score`` are dropped (0, the default, keeps
   every one; an instance without a score is kept).

Instances a method drew itself (SAM) are resolved by score: higher-scoring instances keep
contested pixels, and what a lower one keeps must still pass ``min_area``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ovss_label.converters import Instance
from ovss_label.converters.instance import mask_parts, min_area_pixels
from ovss_label.ontologies import is_background

from .base import Proposal


@dataclass(frozen=True)
class PostprocessConfig:
    """See the module docstring.

    Attributes:
        threshold: lowest winning score for a pixel to get a class (without ``assignment``).
        min_area: smallest instance (and polygon part), a fraction of the image area in [0, 1].
        split: ``"components"`` (one instance per 8-connected part) or ``"class"``.
        min_score: instances scoring below this are dropped (step 6).
    """

    threshold: float = 0.5
    min_area: float = 0.001
    split: str = "components"
    min_score: float = 0.0


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
    min_pixels = min_area_pixels(config.min_area, h, w)
    if proposal.instances is not None:
        return _at_least(resolve_overlaps(proposal.instances, min_pixels), config.min_score)
    labels = assignment_of(proposal, config.threshold)
    found: list[Instance] = []
    for k, name in enumerate(proposal.labels):
        if is_background(name):
            continue
        mask = labels == k
        if not mask.any():
            continue
        for part in _parts(mask, config.split):
            if np.count_nonzero(part) >= min_pixels:
                score = float(proposal.scores[k][part].mean())
                found.append(Instance(part, name, score))
    return _at_least(sorted(found, key=lambda inst: -(inst.score or 0.0)), config.min_score)


def _parts(mask: NDArray[Any], split: str) -> list[NDArray[Any]]:
    if split == "class":
        return [mask]
    count, components = mask_parts(mask)
    return [components == i for i in range(1, count)]


def resolve_overlaps(instances: list[Instance], min_pixels: int) -> list[Instance]:
    """Higher scores keep contested pixels; remainders below ``min_pixels`` are dropped."""
    ordered = sorted(instances, key=lambda inst: -(inst.score or 0.0))
    if not ordered:
        return []
    taken = np.zeros_like(ordered[0].mask)
    kept = []
    for inst in ordered:
        if is_background(inst.label):
            continue
        mask = inst.mask & ~taken
        if np.count_nonzero(mask) >= min_pixels:
            kept.append(Instance(mask, inst.label, inst.score))
            taken |= mask
    return kept


def _at_least(instances: list[Instance], min_score: float) -> list[Instance]:
    """Step 6, applied last: overlaps go to higher scores, so dropping low ones first or last
    leaves the same pixels to the others."""
    return [i for i in instances if i.score is None or i.score >= min_score]
