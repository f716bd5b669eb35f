"""One instance per object: merging the Label Studio results that describe the same object.

Contract
========
A Label Studio record (an annotation or a prediction) can describe one object several times:

- Results that share a region ``id`` are one region (Label Studio's own identity: a region
  drawn with one control and described by others keeps one id).
- ``ovss-label predict --format both`` writes every instance twice, as a brush result and as
  one polygon result per connected part, with the same label and different ids. A polygon
  result is therefore folded into the brush result of its label that covers the largest share
  of its pixels, if that share is at least 0.5, provided the brush and all the polygons folded
  into it overlap with IoU >= 0.5 (the polygons rasterised as pycocotools does and unioned). A
  polygon too thin to cover a pixel centre counts as the pixels its vertices fall in.
- So two distinct objects of one label, one drawn as a brush and one as a polygon, are merged
  only if they overlap that much; brushes never merge with brushes, polygons never with
  polygons, and rectangles merge only by region id.

The kept geometry is the brush (exact, holes included) or, with ``prefer="polygon"``, the
polygons, as one instance whose rings are all of them (one per part). A group without the
preferred kind keeps its first result. Groups stay in result order, at their first member.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from .instance import Instance

__all__ = ["PREFER_CHOICES", "Prefer", "Region", "merge_same_instances"]

Prefer = Literal["brush", "polygon"]
PREFER_CHOICES: tuple[str, ...] = ("brush", "polygon")

Region = tuple[str | None, Instance]
"""(Label Studio region id, instance)."""

_COVER = 0.5  # a polygon belongs to the brush covering at least this share of its pixels...
_PAIR_IOU = 0.5  # ...and is folded into it if the brush and its polygons overlap this much


def merge_same_instances(
    regions: Sequence[Region], prefer: Prefer = "brush"
) -> tuple[list[Region], int]:
    """One region per object (see the module docstring).

    Args:
        regions: the converted results of one record, in result order.
        prefer: ``brush`` or ``polygon``: the geometry kept for an object drawn as both.

    Returns:
        The regions, one per object, and how many results were folded into another.
    """
    if prefer not in PREFER_CHOICES:
        raise ValueError(f"prefer must be one of {PREFER_CHOICES}, got {prefer!r}")
    groups = _fold_polygons_into_brushes(_groups_by_id(regions))
    return [_representative(g, prefer) for g in groups], len(regions) - len(groups)


def _groups_by_id(regions: Sequence[Region]) -> list[list[Region]]:
    groups: dict[Any, list[Region]] = {}
    for index, (rid, inst) in enumerate(regions):
        # A result without an id is its own group; one id on two image sizes is not one region.
        key = (rid, inst.mask.shape) if rid else index
        groups.setdefault(key, []).append((rid, inst))
    return list(groups.values())


def _fold_polygons_into_brushes(groups: list[list[Region]]) -> list[list[Region]]:
    single = {i: g[0][1] for i, g in enumerate(groups) if len(g) == 1}
    brushes = [(i, inst) for i, inst in single.items() if inst.kind == "mask"]
    owned: dict[int, list[int]] = {}
    for i, inst in single.items():
        owner = _covering_brush(inst, brushes) if inst.kind == "polygon" else None
        if owner is not None:
            owned.setdefault(owner, []).append(i)
    folded: set[int] = set()
    for brush, polygons in owned.items():
        union = np.logical_or.reduce([single[p].mask for p in polygons])
        if _iou(single[brush].mask, union) >= _PAIR_IOU:
            groups[brush] = groups[brush] + [groups[p][0] for p in polygons]
            folded.update(polygons)
    return [g for i, g in enumerate(groups) if i not in folded]


def _covering_brush(polygon: Instance, brushes: list[tuple[int, Instance]]) -> int | None:
    """The brush of the polygon's label that covers the largest share (>= _COVER) of it."""
    footprint, box = _footprint(polygon)
    total = np.count_nonzero(footprint)
    best, best_share = None, 0.0
    for index, brush in brushes:
        if brush.label != polygon.label or brush.mask.shape != polygon.mask.shape:
            continue
        share = np.count_nonzero(brush.mask[box] & footprint) / total
        if share > best_share:
            best, best_share = index, share
    return best if best_share >= _COVER else None


def _footprint(polygon: Instance) -> tuple[NDArray[Any], tuple[slice, slice]]:
    """The polygon's pixels inside its vertices' bounding box (a small crop: cheap to compare),
    or the pixels its vertices fall in when it covers no pixel centre."""
    assert polygon.polygons is not None  # kind "polygon" always has its rings
    xy = np.concatenate([np.asarray(r, dtype=np.float64).reshape(-1, 2) for r in polygon.polygons])
    limit = np.array([polygon.width, polygon.height])
    cells = np.clip(np.floor(xy).astype(int), 0, limit - 1)  # the pixel of each vertex
    (x0, y0), (x1, y1) = cells.min(axis=0), cells.max(axis=0) + 1
    box = (slice(int(y0), int(y1)), slice(int(x0), int(x1)))
    crop = polygon.mask[box]
    if crop.any():
        return crop, box
    vertices = np.zeros_like(crop)
    vertices[cells[:, 1] - y0, cells[:, 0] - x0] = True
    return vertices, box


def _iou(a: NDArray[Any], b: NDArray[Any]) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def _representative(group: list[Region], prefer: Prefer) -> Region:
    kind = "mask" if prefer == "brush" else "polygon"
    chosen = [r for r in group if r[1].kind == kind] or group[:1]
    if len(chosen) == 1 or kind == "mask":
        return chosen[0]
    # Several polygons of one object (one per part): one instance holding all their rings.
    parts = [inst for _, inst in chosen]
    mask = np.logical_or.reduce([p.mask for p in parts])
    rings = tuple(ring for p in parts for ring in p.polygons or ())
    merged = Instance(mask, parts[0].label, parts[0].score, polygons=rings, kind="polygon")
    return chosen[0][0], merged
