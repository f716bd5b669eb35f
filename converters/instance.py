"""``Instance``: one labelled object mask, the unit every converter reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["Instance", "InstanceKind", "mask_has_holes"]

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

    Args:
        mask: (H, W) bool; the image border counts as outside.
    """
    background = np.pad(~np.asarray(mask, dtype=bool), 1, constant_values=True)
    n_components, _ = cv2.connectedComponents(background.astype(np.uint8), connectivity=4)
    return bool(n_components > 2)  # label 0 is the mask itself, label 1 the outside
