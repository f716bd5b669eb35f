"""Label Studio results <-> ``Instance``: BrushLabels, PolygonLabels, RectangleLabels.

Format contract (Label Studio 1.20-1.23 result items)
=====================================================
- Every region result carries ``original_width`` / ``original_height`` (the image's pixel size
  as Label Studio loaded it, EXIF orientation applied) and ``image_rotation`` (degrees the user
  rotated the image in the editor). Coordinates are relative to the *rotated* view, so a
  non-zero ``image_rotation`` cannot be mapped back here: that region gets ``RegionError``.
- ``brushlabels``: ``value = {"format": "rle", "rle": [ints 0..255], "brushlabels": [label]}``;
  the RLE is Label Studio's own (see ``brush``), its alpha channel is the mask. Like Label
  Studio's BRUSH_TO_COCO export, any non-zero alpha counts as inside.
- ``polygonlabels``: ``value = {"points": [[x%, y%], ...], "polygonlabels": [label],
  "closed": true}``. Percent of ``original_width`` / ``original_height`` in [0, 100], in the
  pixel-edge frame of ``polygons`` (x_px = x% * W / 100). Polygons have no holes. A mask gives
  one polygon region per 8-connected part (the parts of ``instance``, as instances are split),
  its exterior ring; parts below the minimum area give none (``instance_to_results``).
- ``rectanglelabels``: ``value = {"x", "y", "width", "height"`` (percent), ``"rotation"``
  (degrees, clockwise on screen, about the top-left corner ``(x, y)``), ``"rectanglelabels"}``.
  The rotation is applied in pixels (Label Studio's editor rotates the drawn shape).
- Several labels on one region: the first is used.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from .brush import BrushRLEError, brush_rle_bytes, brush_rle_to_mask
from .instance import Instance, min_area_pixels
from .polygons import mask_to_polygons, polygons_to_mask

__all__ = [
    "REGION_TYPES",
    "RegionError",
    "instance_to_results",
    "instances_to_results",
    "result_to_instance",
]

REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")
"""Result types that carry a region we convert; others (choices, text, ...) are not regions."""

MAX_REGION_PIXELS = 1 << 28
"""Largest image (width x height) a region is decoded at: 16384 x 16384. A result claiming a
larger size is refused rather than allocating a mask of gigabytes."""

OutputKind = Literal["brush", "polygon", "both"]
# Percent keeps 6 decimals (5e-5 px of error on a 10k-pixel side), and pixels read back are
# snapped to 1e-3 px: our half-pixel vertices survive px -> % -> px exactly. That matters:
# pycocotools rounds vertices to a 1/5-px grid, and x.5 sits on a rounding boundary there.
_PERCENT_DECIMALS = 6
_PIXEL_DECIMALS = 3


class RegionError(ValueError):
    """A Label Studio result that cannot be turned into a mask; the message says why."""

    def __init__(self, message: str, region_id: str | None = None) -> None:
        super().__init__(message)
        self.region_id = region_id


def result_to_instance(result: dict[str, Any]) -> Instance | None:
    """One Label Studio result item to an ``Instance``.

    Args:
        result: an item of an annotation's or prediction's ``result`` list.

    Returns:
        The instance, or None when the item is not a region type we convert (``REGION_TYPES``).

    Raises:
        RegionError: missing size, rotated image, no label, undecodable RLE, too few points.
    """
    kind = str(result.get("type", "")).lower()
    if kind not in REGION_TYPES:
        return None
    region_id = result.get("id")
    try:
        height, width = _size(result)
        value = result.get("value") or {}
        if not isinstance(value, dict):
            raise RegionError(f"value is a {type(value).__name__}, not an object")
        label = _label(value, kind)
        score = result.get("score")
        score = float(score) if isinstance(score, (int, float)) else None
        if kind == "brushlabels":
            return Instance(_brush_mask(value, height, width), label, score)
        if kind == "polygonlabels":
            ring = _polygon_ring(value, height, width)
            mask = polygons_to_mask([ring], height, width)
            return Instance(mask, label, score, polygons=(ring,), kind="polygon")
        corners = rectangle_corners(value, height, width)
        mask = polygons_to_mask([corners], height, width)
        return Instance(mask, label, score, polygons=(corners,), kind="box")
    except RegionError as err:
        err.region_id = region_id
        raise
    except (TypeError, ValueError, KeyError) as err:  # malformed JSON values
        raise RegionError(f"malformed {kind} result: {err}", region_id) from err


def _size(result: dict[str, Any]) -> tuple[int, int]:
    width, height = result.get("original_width"), result.get("original_height")
    if not width or not height:
        raise RegionError("result has no original_width/original_height (image size unknown)")
    try:
        sizes = (float(width), float(height))
    except (TypeError, ValueError):
        sizes = (math.nan, math.nan)
    if not all(1 <= v < math.inf for v in sizes):
        raise RegionError(f"image size {width!r} x {height!r} is not a size in pixels")
    if int(width) * int(height) > MAX_REGION_PIXELS:
        raise RegionError(
            f"image size {int(width)} x {int(height)} is over {MAX_REGION_PIXELS} pixels: "
            "not decoded (a mask of that size would not fit in memory)"
        )
    rotation = result.get("image_rotation") or 0
    if float(rotation) % 360 != 0:
        raise RegionError(
            f"image_rotation={rotation}: the region was drawn on a rotated image, whose"
            " coordinates cannot be mapped back; reset the rotation in Label Studio and re-save"
        )
    return int(height), int(width)


def region_label(value: Any, kind: str) -> str | None:
    """A region's label: the first name in ``value[kind]`` (else ``value["labels"]``); a bare
    string (written by some scripts instead of a one-item list) is the name itself. None when
    there is none."""
    if not isinstance(value, dict):
        return None
    labels = value.get(kind) or value.get("labels")
    if isinstance(labels, str):
        return labels.strip() or None
    if isinstance(labels, list) and labels and str(labels[0]).strip():
        return str(labels[0])
    return None


def _label(value: dict[str, Any], kind: str) -> str:
    label = region_label(value, kind)
    if label is None:
        raise RegionError(f"region has no label (value.{kind} is empty)")
    return label


def _brush_mask(value: dict[str, Any], height: int, width: int) -> NDArray[Any]:
    if value.get("format", "rle") != "rle" or "rle" not in value:
        raise RegionError(f"brush format {value.get('format')!r} is not supported (need 'rle')")
    try:
        return brush_rle_to_mask(value["rle"], height, width) > 0
    except BrushRLEError as err:
        raise RegionError(f"undecodable brush RLE: {err}") from err


def _polygon_ring(value: dict[str, Any], height: int, width: int) -> NDArray[Any]:
    points = np.asarray(value.get("points", []), dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(points).all():  # NaN / null would crash pycocotools' rasteriser
        raise RegionError("polygon has a point that is not a finite number")
    if len(points) < 3:
        raise RegionError(f"polygon has {len(points)} points; at least 3 are needed")
    ring: NDArray[np.float64] = np.round(
        np.clip(points, 0.0, 100.0) * np.array([width, height]) / 100.0, _PIXEL_DECIMALS
    )
    return ring


def rectangle_corners(value: dict[str, Any], height: int, width: int) -> NDArray[Any]:
    """(4, 2) pixel corners of a Label Studio rectangle, rotated about its top-left corner."""
    x, y = float(value["x"]) * width / 100, float(value["y"]) * height / 100
    w, h = float(value["width"]) * width / 100, float(value["height"]) * height / 100
    if not all(math.isfinite(v) for v in (x, y, w, h, float(value.get("rotation") or 0.0))):
        raise RegionError("rectangle has a coordinate that is not a finite number")
    if w <= 0 or h <= 0:
        raise RegionError(f"rectangle has no area ({w:.2f} x {h:.2f} px)")
    theta = math.radians(float(value.get("rotation") or 0.0))
    along_w = np.array([math.cos(theta), math.sin(theta)]) * w  # y points down: clockwise
    along_h = np.array([-math.sin(theta), math.cos(theta)]) * h
    origin = np.array([x, y])
    corners = np.stack([origin, origin + along_w, origin + along_w + along_h, origin + along_h])
    return np.round(corners, _PIXEL_DECIMALS)


def instance_to_results(
    instance: Instance,
    kind: OutputKind = "brush",
    *,
    brush_name: str = "brush",
    polygon_name: str = "polygon",
    rectangle_name: str = "bbox",
    to_name: str = "image",
    tolerance_px: float = 1.0,
    max_vertices: int = 1000,
    min_area_fraction: float = 0.0,
) -> list[dict[str, Any]]:
    """Label Studio result items for one instance.

    A ``box`` instance (a rectangle is all it is) always becomes one ``rectanglelabels`` item.

    Args:
        instance: the object; its mask size is the image's original size.
        kind: ``brush`` (exact, keeps holes), ``polygon`` (one region per 8-connected part,
            exteriors only: Label Studio polygons have no holes) or ``both``.
        brush_name: ``from_name`` of the ``<BrushLabels>`` control.
        polygon_name: ``from_name`` of the ``<PolygonLabels>`` control.
        rectangle_name: ``from_name`` of the ``<RectangleLabels>`` control.
        to_name: name of the ``<Image>`` object.
        tolerance_px: polygon simplification tolerance (see ``mask_to_polygons``).
        max_vertices: vertex cap per polygon.
        min_area_fraction: smallest polygon part, as a fraction of the image area (the unit of
            ``--min-area`` / ``PostprocessConfig.min_area``); ``min_area_pixels`` turns it into
            the pixel count ``mask_to_polygons`` takes, at least 1 px. No polygon region with a
            smaller area is written. Brush results are not filtered.

    Returns:
        Result dicts; empty when the mask is empty.
    """
    if kind not in ("brush", "polygon", "both"):
        raise ValueError(f"kind must be brush, polygon or both, got {kind!r}")
    if not instance.mask.any():
        return []
    if instance.kind == "box" and instance.polygons:
        return [_rectangle_result(instance, rectangle_name, to_name)]
    results = []
    if kind in ("brush", "both"):
        results.append(_brush_result(instance, brush_name, to_name))
    if kind in ("polygon", "both"):
        min_px = min_area_pixels(min_area_fraction, instance.height, instance.width)
        rings = _polygon_rings(instance, tolerance_px, max_vertices, min_px)
        results += [_polygon_result(instance, r, polygon_name, to_name) for r in rings]
    return results


def instances_to_results(
    instances: Iterable[Instance], kind: OutputKind = "brush", **options: Any
) -> list[dict[str, Any]]:
    """``instance_to_results`` for each instance, concatenated (one annotation's ``result``)."""
    return [r for inst in instances for r in instance_to_results(inst, kind, **options)]


def _polygon_rings(
    instance: Instance, tolerance_px: float, max_vertices: int, min_area_px: int
) -> list[NDArray[Any]]:
    """(N, 2) pixel-edge xy exterior rings, one per polygon region."""
    if instance.polygons is not None:
        return list(instance.polygons)  # vector source: its own vertices are exact
    polygons = mask_to_polygons(instance.mask, tolerance_px, max_vertices, min_area=min_area_px)
    return [np.asarray(p.exterior.coords)[:-1] for p in polygons]


def _base(instance: Instance, kind: str, from_name: str, to_name: str) -> dict[str, Any]:
    result: dict[str, Any] = {
        "from_name": from_name,
        "to_name": to_name,
        "type": kind,
        "original_width": instance.width,
        "original_height": instance.height,
        "image_rotation": 0,
        "readonly": False,
    }
    if instance.score is not None:
        result["score"] = round(float(instance.score), 6)
    return result


def _brush_result(instance: Instance, from_name: str, to_name: str) -> dict[str, Any]:
    rle = brush_rle_bytes(instance.mask)
    result = _base(instance, "brushlabels", from_name, to_name)
    result["value"] = {"format": "rle", "rle": rle.tolist(), "brushlabels": [instance.label]}
    result["id"] = _brush_region_id(from_name, instance.label, rle)
    return result


def _polygon_result(
    instance: Instance, ring: NDArray[Any], from_name: str, to_name: str
) -> dict[str, Any]:
    scale = np.array([100.0 / instance.width, 100.0 / instance.height])
    percent = np.clip(np.round(ring * scale, _PERCENT_DECIMALS), 0.0, 100.0)
    points = percent.tolist()
    result = _base(instance, "polygonlabels", from_name, to_name)
    result["value"] = {"points": points, "polygonlabels": [instance.label], "closed": True}
    result["id"] = region_id(from_name, instance.label, points)
    return result


def _rectangle_result(instance: Instance, from_name: str, to_name: str) -> dict[str, Any]:
    assert instance.polygons is not None
    value = rectangle_value(instance.polygons[0], instance.height, instance.width)
    result = _base(instance, "rectanglelabels", from_name, to_name)
    result["value"] = {**value, "rectanglelabels": [instance.label]}
    result["id"] = region_id(from_name, instance.label, value)
    return result


def region_id(*parts: object) -> str:
    """A short region id, deterministic in its content (predictions files diff cleanly)."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def _brush_region_id(from_name: str, label: str, rle: NDArray[np.uint8]) -> str:
    """``region_id(from_name, label, rle.tolist())``, the same id, with the text hashed built by
    numpy: ``repr`` of a list of ~100k ints took 7 ms of a 512x512 click's answer."""
    head = repr((from_name, label, [])).encode()  # "('tag', 'Cat', [])": the list goes inside
    text = head[:-3] + _uint8_list_repr(rle) + head[-1:]
    return hashlib.sha1(text).hexdigest()[:10]


@lru_cache(maxsize=1)
def _decimal_cells() -> NDArray[np.uint64]:
    """(256,) uint64: the ASCII of ``f"{v}, "`` for v in 0..255 in 8 bytes, zero-padded."""
    cells = np.zeros((256, 8), np.uint8)
    for v in range(256):
        text = f"{v}, ".encode()
        cells[v, : len(text)] = np.frombuffer(text, np.uint8)
    return cells.view(np.uint64)[:, 0].copy()


def _uint8_list_repr(values: NDArray[np.uint8]) -> bytes:
    """``repr(values.tolist()).encode()`` of a 1-D uint8 array."""
    if values.size == 0:
        return b"[]"
    text = _decimal_cells()[values].view(np.uint8)
    body: bytes = text[text != 0].tobytes()  # drops the padding: the text has no zero byte
    return b"[" + body[:-2] + b"]"  # no ", " after the last value


def rectangle_value(
    corners: Sequence[Sequence[float]] | NDArray[Any], height: int, width: int
) -> dict[str, Any]:
    """Label Studio rectangle value (percent + rotation) from ``rectangle_corners``' output.

    Args:
        corners: (4, 2) pixel corners in the order origin, +width, +width+height, +height.
        height: image height in pixels.
        width: image width in pixels.
    """
    xy = np.asarray(corners, dtype=np.float64).reshape(4, 2)
    along_w, along_h = xy[1] - xy[0], xy[3] - xy[0]
    rotation = math.degrees(math.atan2(along_w[1], along_w[0])) % 360.0
    return {
        "x": round(100.0 * xy[0, 0] / width, _PERCENT_DECIMALS),
        "y": round(100.0 * xy[0, 1] / height, _PERCENT_DECIMALS),
        "width": round(100.0 * float(np.hypot(*along_w)) / width, _PERCENT_DECIMALS),
        "height": round(100.0 * float(np.hypot(*along_h)) / height, _PERCENT_DECIMALS),
        "rotation": round(rotation, 6),
    }
