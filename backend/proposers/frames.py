"""The one owner of coordinate frames for dense proposers.

Three frames, all (rows, cols) = (H, W):

- **original**: the image as the user and Label Studio see it (EXIF orientation applied).
- **network**: the resized image CLIP sees. NACLIP resizes like mmseg's
  ``Resize(scale=(2048, S), keep_ratio=True)``: factor ``min(2048/long, S/short)``, sizes
  rounded with ``int(x * f + 0.5)`` (mmcv ``rescale_size``), bilinear (mmcv's cv2 backend).
- **work**: where logits are upsampled to and PAMR runs. The reference uses the original size;
  here too, unless the long side exceeds ``max_side`` (a 12 MP phone photo with 50 queries would
  need gigabytes), in which case the work frame is the original scaled to ``max_side`` and the
  final class probabilities are upsampled bilinearly to the original size.

Sliding windows live in the network frame (mmseg ``slide_inference`` as in NACLIP
``forward_slide``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import torch
import torch.nn.functional as F
from numpy.typing import NDArray


def _scaled(size: tuple[int, int], factor: float) -> tuple[int, int]:
    return int(size[0] * factor + 0.5), int(size[1] * factor + 0.5)


@dataclass(frozen=True)
class Frames:
    """Sizes of the three frames of one image (module docstring)."""

    original: tuple[int, int]
    network: tuple[int, int]
    work: tuple[int, int]

    @classmethod
    def for_image(
        cls, original: tuple[int, int], short_side: int, long_cap: int = 2048, max_side: int = 2048
    ) -> Frames:
        """Frames of an image of ``original`` (H, W) size.

        Args:
            original: (H, W) of the image.
            short_side: Target short side of the network input (NACLIP: 336; 560 Cityscapes).
            long_cap: The long side of the network input never exceeds this (mmseg's 2048).
            max_side: Largest long side of the work frame.
        """
        h, w = original
        factor = min(long_cap / max(h, w), short_side / min(h, w))
        work = original if max(h, w) <= max_side else _scaled(original, max_side / max(h, w))
        return cls(original, _scaled(original, factor), work)

    def to_network(self, image: NDArray[Any]) -> NDArray[Any]:
        """(H, W, 3) uint8 original -> network frame, bilinear (cv2, as mmcv)."""
        h, w = self.network
        if (h, w) == image.shape[:2]:
            return image
        return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)

    def to_work(self, maps: torch.Tensor) -> torch.Tensor:
        """(C, h, w) maps of any frame -> (C, *work), bilinear, ``align_corners=False``."""
        return _resize(maps, self.work)

    def to_original(self, maps: torch.Tensor) -> torch.Tensor:
        """(C, *work) maps -> (C, *original), bilinear; identity when the frames agree."""
        return _resize(maps, self.original)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def sliding_windows(
    height: int, width: int, crop: int, stride: int
) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) in the network frame, mmseg ``slide_inference`` order.

    ``crop=0`` means one window over the whole image (NACLIP's VOC configs). A crop larger
    than the image is clipped to it. The last row/column of windows is shifted back inside the
    image, so every window is ``crop`` wide where the image allows.
    """
    if crop <= 0:
        return [(0, height, 0, width)]
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, height), min(c * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes
