"""``Instance``: one labelled object mask, the unit every converter reads and writes.

Parts contract
==============
- A *part* of a mask is an 8-connected component (``PART_CONNECTIVITY``): pixels that touch at
  an edge or only at a corner are one part, which is what a user calls "one object". Instances
  split per part (``backend/proposers/postprocess.py``) and polygon parts (``polygons``) use this
  one connectivity, so an instance made of one part becomes exactly one polygon.
- A *hole* is background that is not 4-connected to the outside (the dual of 8-connected parts:
  background touching the outside only at a corner is still enclosed).
- Minimum part areas are counted in pixels; ``--min-area`` is a fraction of the image area, and
  ``min_area_pixels`` is the one conversion between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = [
    "PART_CONNECTIVITY",
    "Instance",
    "InstanceKind",
    "mask_has_holes",
    "mask_parts",
    "min_area_pixels",
]

PART_CONNECTIVITY = 8
"""OpenCV connectivity of a mask's parts (see the module docstring); holes use the dual, 4."""

InstanceKind = Literal["mask", "polygon", "box"]
"""Which geometry is the truth: the raster (``mask``), or the source vertices (``polygon``,
``box``: the 4 corners of a possibly rotated rectangle). The mask is always filled in."""


@dataclass
class Instance:
    """One object: a mask in the original image's pixel grid, its label and an optional score.

    Attributes:
        mask: (H, W) bool, row 0 at the top.
        label: the class name (a Label Studio label value / COCO category name).
        score: model confidence in [0, 1], or None for human labels.
        polygons: for vector sources (Label Studio polygons and rectangles, COCO polygons), the
            exact source rings, each (N, 2) float64 xy in the pixel-edge frame (see
            ``polygons``); None for raster sources.
        kind: which geometry is the truth (see ``InstanceKind``).
    """

    mask: NDArray[Any]
    label: str
    score: float | None = None
    polygons: tuple[NDArray[Any], ...] | None = field(default=None, repr=False)
    kind: InstanceKind = "mask"

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"Instance mask must be 2-D (H, W), got shape {mask.shape}")
        self.mask = mask if mask.dtype == bool else mask != 0
        if self.kind != "mask" and not self.polygons:
            raise ValueError(f"an Instance of kind {self.kind!r} needs its source polygons")

    @property
    def height(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    @property
    def area(self) -> int:
        """Mask area in pixels."""
        return int(np.count_nonzero(self.mask))

    def has_holes(self) -> bool:
        """Whether the mask encloses background (COCO and LS polygons cannot represent it)."""
        return mask_has_holes(self.mask)


def mask_has_holes(mask: NDArray[Any]) -> bool:
    """Whether background pixels are enclosed by the mask (not 4-connected to the outside).

    4-connected background is the dual of ``PART_CONNECTIVITY``: a background pixel that meets
    the outside only at a corner is enclosed, since the part's pixels at that corner are joined.

    Args:
        mask: (H, W) bool; the image border counts as outside.
    """
    background = np.pad(~np.asarray(mask, dtype=bool), 1, constant_values=True)
    n_components, _ = cv2.connectedComponents(background.astype(np.uint8), connectivity=4)
    return bool(n_components > 2)  # label 0 is the mask itself, label 1 the outside


def mask_parts(mask: NDArray[Any]) -> tuple[int, NDArray[np.int32]]:
    """Label the parts (``PART_CONNECTIVITY``-connected components) of a mask.

    Args:
        mask: (H, W); non-zero is inside.

    Returns:
        ``(count, labels)``: labels is (H, W) int32, 0 outside and 1..count-1 for the parts.
    """
    binary = (np.asarray(mask) != 0).astype(np.uint8)
    count, labels = cv2.connectedComponents(binary, connectivity=PART_CONNECTIVITY)
    return int(count), labels


def min_area_pixels(fraction: float, height: int, width: int) -> int:
    """A minimum area given as a fraction of the image (``--min-area``) in whole pixels.

    A part passes when its pixel count is at least ``ceil(fraction * height * width)``, and never
    fewer than one pixel (so 0 keeps every part and an empty mask is never an instance).

    Raises:
        ValueError: ``fraction`` is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"min_area is a fraction of the image area in [0, 1], got {fraction}")
    # Rounded first: 0.07 * 10 * 10 is 7.000000000000001 in floats, and must stay 7 pixels.
    return max(1, math.ceil(round(fraction * height * width, 6)))
