"""Shared test helpers: synthetic masks and independent oracles (pycocotools, the LS SDK)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from pycocotools import mask as coco_mask

FIXTURES = Path(__file__).parent / "fixtures"
LS_EXPORT = FIXTURES / "ls_export.json"
LABEL_CONFIG = FIXTURES / "label_config.xml"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def coco_raster(rings: list[list[float]], h: int, w: int) -> np.ndarray:
    """pycocotools' own rasterisation of polygon rings (unioned)."""
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(rings, h, w))).astype(bool)


def sdk_alpha(rle: list[int], h: int, w: int) -> np.ndarray:
    """The SDK's decoding of brush RLE, alpha channel (as ``decode_from_annotation``)."""
    return decode_rle(rle).reshape(h, w, 4)[:, :, 3]


def source_mask(result: dict) -> np.ndarray:
    """A Label Studio result's mask, decoded with the SDK / pycocotools only."""
    w, h = result["original_width"], result["original_height"]
    value = result["value"]
    if result["type"] == "brushlabels":
        return sdk_alpha(value["rle"], h, w) > 0
    if result["type"] == "polygonlabels":
        ring = [c for x, y in value["points"] for c in (x * w / 100, y * h / 100)]
        return coco_raster([ring], h, w)
    raise ValueError(result["type"])


def load_export() -> list[dict]:
    return json.loads(LS_EXPORT.read_text(encoding="utf-8"))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled (flood fill of the outside from a padded corner)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    cv2.floodFill(padded, None, (0, 0), 2)
    return (padded != 2)[1:-1, 1:-1]
