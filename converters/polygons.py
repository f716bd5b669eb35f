"""Masks to polygons with holes, and polygons back to masks, in the COCO pixel-edge frame.

Format contract
===============
- Frame: pixel coordinates with x to the right and y down; the origin is the *top-left corner*
  of pixel (row 0, col 0), so pixel (r, c) covers the square [c, c+1) x [r, r+1). This is the
  frame in which pycocotools rasterises polygons: the polygon (2,2)-(5,2)-(5,4)-(2,4) decodes to
  exactly rows 2..3 x cols 2..4. Label Studio percent coordinates are this frame scaled by
  100 / original_width and 100 / original_height (see ``labelstudio``).
- A mask is (H, W) bool (or any array where non-zero means inside), row 0 at the top.
- ``mask_to_polygons`` returns one ``shapely.Polygon`` per part: an exterior ring and its
  holes. Parts are 8-connected, as instances are (``instance.PART_CONNECTIVITY``): pixels that
  touch only at a corner are one part, and one polygon. Holes are background not 4-connected to
  the outside. Before simplification, outlines run through the midpoints of the pixel edges
  between inside and outside (the iso-0.5 contour): rasterised, they give back the exact mask.
  Where two pixels of a part touch only at a corner, the outline crosses that corner as a
  diagonal neck 1/sqrt(2) px wide, so rings never touch themselves (no pinch at the corner point,
  which shapely would call invalid) and the two background pixel centres there stay 0.35 px out.
- Areas are in pixels (px^2 in this frame). ``min_area`` drops parts with fewer pixels, fills
  holes with fewer, and no polygon with a smaller (shapely) area is returned. The iso-0.5 outline
  is up to 0.5 px^2 smaller than its part's pixel count (each cut convex corner takes 1/8 px^2),
  and simplification moves it further: a part with enough pixels whose polygon falls short gets
  its pixel-edge outline instead (concave corners cut, area >= pixel count, still exact), and
  so does, without tracing twice, one with fewer than ``min_area + 0.5`` pixels (its outline
  may fall short). So a part of >= ``min_area`` pixels keeps one polygon and no part below it
  is written.
  ``--min-area`` (a fraction of the image) converts with ``instance.min_area_pixels``.
- COCO polygon lists (``[[x1, y1, x2, y2, ...], ...]``) cannot hold holes: their rings are
  unioned. Label Studio ``PolygonLabels`` cannot hold holes either. A mask with holes is exact
  as RLE (COCO) or brush RLE (Label Studio); as polygons, only its exteriors are kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeAlias

import cv2
import numpy as np
import shapely
import shapely.affinity
from numpy.typing import NDArray
from pycocotools import mask as coco_mask
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.polygon import orient

from .instance import PART_CONNECTIVITY

__all__ = ["PolygonLike", "mask_to_polygons", "polygons_to_mask", "ring_to_flat"]

PolygonLike: TypeAlias = Polygon | Sequence[float] | NDArray[Any]
"""A ``shapely.Polygon`` (holes honoured), a flat COCO ring ``[x1, y1, ...]``, or (N, 2) xy."""

_SMALL_PART_PX = 16  # parts whose bounding box has at most this many pixels stay unsimplified

DEFAULT_MAX_VERTICES = 1000
"""Label Studio freezes on polygons with thousands of points (label-studio#4617)."""


def mask_to_polygons(
    mask: NDArray[Any],
    tolerance_px: float = 1.0,
    max_vertices: int = DEFAULT_MAX_VERTICES,
    min_area: float = 1.0,
    min_iou: float = 0.98,
) -> list[Polygon]:
    """Trace every 8-connected part of a mask as a polygon with holes, then simplify it.

    Args:
        mask: (H, W) mask; non-zero is inside.
        tolerance_px: Douglas-Peucker tolerance in pixels (topology-preserving: holes stay inside
            their exterior and rings do not cross). 0 only drops collinear points.
        max_vertices: cap on the vertices of one exterior ring; a part's tolerance is doubled
            until its exteriors fit. Label Studio's editor freezes on thousands of points.
        min_area: in pixels (px^2). Parts with fewer pixels are dropped, holes with fewer are
            filled, and every polygon returned has at least this shapely area (see the module
            docstring). ``instance.min_area_pixels`` converts ``--min-area`` fractions.
        min_iou: a part whose simplified polygons, rasterised, would overlap it by less than
            this IoU is simplified with a halved tolerance, down to 0 (thin bars and specks keep
            their shape); the vertex cap wins over this.

    Returns:
        Polygons in the pixel-edge frame, largest first; exteriors counter-clockwise in the
        y-down frame as shapely orients them (``orient(p, 1.0)``), holes the other way.
    """
    binary = np.asarray(mask)
    if binary.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {binary.shape}")
    if max_vertices < 4:
        raise ValueError("max_vertices must be at least 4 (a ring needs 3 distinct points)")
    if tolerance_px < 0:
        raise ValueError("tolerance_px must be >= 0")
    if min_area < 0:
        raise ValueError("min_area must be >= 0 (pixels)")
    out: list[Polygon] = []
    for crop, x0, y0, pixels in _parts(binary != 0, min_area):
        # Within 0.5 px^2 of min_area the iso-0.5 outline may fall short: skip tracing it twice
        # (a speck at the default min_area=1 is a 0.5 px^2 diamond).
        simple: list[Polygon] = []
        if pixels - 0.5 >= min_area:
            simple = _part_polygons(crop, (x0, y0), tolerance_px, max_vertices, min_iou)
        if not simple or any(p.area < min_area for p in simple):
            simple = _pixel_edge_polygons(crop, (x0, y0), max_vertices)
        out.extend(orient(p, 1.0) for p in simple if p.area > 0 and p.area >= min_area)
    out.sort(key=lambda p: -p.area)
    return out


def _part_polygons(
    crop: NDArray[Any],
    origin: tuple[int, int],
    tolerance: float,
    max_vertices: int,
    min_iou: float,
) -> list[Polygon]:
    """One part's iso-0.5 outline, simplified under the IoU guard and the vertex cap."""
    traced = _trace_part(crop, *origin)
    simple = _simplify_part(traced, crop, origin, tolerance, min_iou)
    return _cap_vertices(traced, simple, max_vertices)


def _pixel_edge_polygons(
    crop: NDArray[Any], origin: tuple[int, int], max_vertices: int
) -> list[Polygon]:
    """One part's outline along pixel edges: area >= its pixel count, rasterised exactly.

    The fallback for a part whose iso-0.5 polygon is below ``min_area`` although its pixels are
    not. Only collinear points are dropped, so only the vertex cap can take area away.
    """
    traced = _trace_part(crop, *origin, cut_corners=False)
    return _cap_vertices(traced, [_simplify_once(p, 0.0) for p in traced], max_vertices)


def _parts(binary: NDArray[Any], min_area: float) -> Iterator[tuple[NDArray[Any], int, int, int]]:
    """Each 8-connected part with >= ``min_area`` pixels: its bbox crop (small holes filled),
    the crop's column and row in the mask, and the part's pixel count."""
    n_parts, labels, stats, _ = cv2.connectedComponentsWithStats(
        binary.astype(np.uint8), connectivity=PART_CONNECTIVITY
    )
    for part in range(1, n_parts):
        x, y, w, h, area = (int(v) for v in stats[part])
        if area >= min_area:
            yield _fill_small_holes(labels[y : y + h, x : x + w] == part, min_area), x, y, area


def _fill_small_holes(part: NDArray[Any], min_area: float) -> NDArray[Any]:
    """Fill the holes with < min_area pixels (4-connected background: the dual of the parts)."""
    padded = np.pad(~part, 1, constant_values=True).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(padded, connectivity=4)
    outside = labels[0, 0]
    small = [i for i in range(1, n) if i != outside and stats[i, cv2.CC_STAT_AREA] < min_area]
    if not small:
        return part
    return part | np.isin(labels[1:-1, 1:-1], small)


def _trace_part(crop: NDArray[Any], x0: int, y0: int, cut_corners: bool = True) -> list[Polygon]:
    """Outline of one 8-connected part (and its holes), through the midpoints of pixel edges.

    OpenCV traces pixel *centres*, which would pull every outline half a pixel inwards. So the
    part is drawn on a half-pixel lattice (2H+1, 2W+1), whose even points are pixel corners: a
    lattice point is set when it lies in the closed square of a set pixel. Traced there and
    halved, contours run along pixel edges, with concave corners cut by 8-connected tracing;
    cutting the convex corners too gives the iso-0.5 contour through edge midpoints. It is as
    exact as the pixel edges when rasterised (pixel centres stay >= 0.35 px inside or outside),
    and a staircase becomes a straight line, which simplifies well.

    Two pixels touching at a corner share that lattice point, so the lattice keeps them in one
    8-connected blob, and 8-connected tracing cuts the two concave turns there: the ring passes
    the corner as a 1/sqrt(2) px diagonal neck, never through the corner point twice.

    Args:
        crop: (h, w) bool, one part in its bounding box.
        x0: column of ``crop``'s left edge in the mask (pixel-edge frame).
        y0: row of ``crop``'s top edge in the mask.
        cut_corners: False keeps the convex corners: the pixel-edge outline (concave corners
            still cut), whose area is at least the part's pixel count.
    """
    h, w = crop.shape
    centres = np.zeros((2 * h + 3, 2 * w + 3), dtype=np.uint8)  # +1 zero border on each side
    centres[2 : 2 * h + 1 : 2, 2 : 2 * w + 1 : 2] = crop
    lattice = cv2.dilate(centres, np.ones((3, 3), np.uint8))
    contours, hierarchy = cv2.findContours(lattice, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    offset = np.array([2 * x0 - 1, 2 * y0 - 1], dtype=np.float64)

    def ring(i: int) -> NDArray[Any]:
        points = (contours[i].reshape(-1, 2) + offset) / 2.0
        return _cut_square_corners(points) if cut_corners else points

    polygons = []
    for i, (_, _, first_child, parent) in enumerate(hierarchy[0]):
        if parent != -1:
            continue
        holes, child = [], first_child
        while child != -1:
            holes.append(ring(child))
            child = hierarchy[0][child][0]
        polygons.extend(_valid_polygons(ring(i), holes))
    return polygons


def _valid_polygons(exterior: NDArray[Any], holes: list[NDArray[Any]]) -> list[Polygon]:
    """Valid polygons from traced rings; ``make_valid`` is a guard, for rings that would meet.

    8-connected tracing turns every corner contact (within a ring, or between a hole and its
    exterior) into a neck, so traced rings are not expected to touch; if they did, the pieces
    ``make_valid`` returns would each have to pass ``min_area`` on their own.
    """
    if len(exterior) < 3:
        return []
    poly = Polygon(exterior, [h for h in holes if len(h) >= 3])
    if poly.is_valid:
        return [poly]
    fixed = shapely.make_valid(poly)
    geoms = getattr(fixed, "geoms", [fixed])
    flat = [q for g in geoms for q in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    return [g for g in flat if isinstance(g, Polygon) and g.area > 0]


def _cut_square_corners(ring: NDArray[Any]) -> NDArray[Any]:
    """Cut the right-angle corners that are steps of a staircase, keeping real corners.

    A right-angle vertex with an edge of at most 1 px (a step: edges that end at a cut concave
    corner are 0.5 px shorter) is replaced by the points half a pixel along its two edges, so
    staircases become straight lines; corners between two longer edges (rectangles) stay sharp.
    """
    prev_dir = ring - np.roll(ring, 1, axis=0)
    next_dir = np.roll(ring, -1, axis=0) - ring
    axis_in = (prev_dir == 0).any(axis=1)
    axis_out = (next_dir == 0).any(axis=1)
    right_angle = axis_in & axis_out & ((prev_dir * next_dir).sum(axis=1) == 0)
    short = np.minimum(np.abs(prev_dir).sum(axis=1), np.abs(next_dir).sum(axis=1)) <= 1.0
    cut = (right_angle & short)[:, None]
    before = np.where(cut, ring - np.sign(prev_dir) * 0.5, ring)
    after = np.where(cut, ring + np.sign(next_dir) * 0.5, ring)
    points = np.stack((before, after), axis=1).reshape(-1, 2)
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    return points[keep]


def _simplify_part(
    traced: list[Polygon],
    crop: NDArray[Any],
    origin: tuple[int, int],
    tolerance: float,
    min_iou: float,
) -> list[Polygon]:
    if crop.size <= _SMALL_PART_PX:
        tolerance = 0.0  # a few pixels: nothing to gain, and specks would lose their shape
    while True:
        simple = [_simplify_once(p, tolerance) for p in traced]
        if tolerance == 0 or _iou_with_crop(simple, crop, origin) >= min_iou:
            return simple
        tolerance = tolerance / 2 if tolerance > 0.125 else 0.0


def _cap_vertices(traced: list[Polygon], simple: list[Polygon], max_vertices: int) -> list[Polygon]:
    return [
        c if _n_vertices(c) <= max_vertices else _fit_vertex_cap(p, max_vertices)
        for p, c in zip(traced, simple, strict=True)
    ]


def _fit_vertex_cap(poly: Polygon, max_vertices: int) -> Polygon:
    """Simplify harder until the exterior has at most ``max_vertices`` vertices.

    Topology-preserving simplification cannot pass holes that hug the exterior, so past the
    polygon's own size the exterior is simplified alone and only the holes it still contains
    are kept.
    """
    size = max(poly.bounds[2] - poly.bounds[0], poly.bounds[3] - poly.bounds[1], 1.0)
    tolerance = 0.5
    while tolerance <= size:
        candidate = _simplify_once(poly, tolerance)
        if _n_vertices(candidate) <= max_vertices:
            return candidate
        tolerance *= 2
    tolerance = 0.5
    while tolerance <= 4 * size:
        shell = Polygon(poly.exterior).simplify(tolerance, preserve_topology=False)
        if isinstance(shell, Polygon) and not shell.is_empty and _n_vertices(shell) <= max_vertices:
            holes = [h for h in poly.interiors if shell.contains(Polygon(h))]
            return Polygon(shell.exterior, holes)
        tolerance *= 2
    return shapely.minimum_rotated_rectangle(poly)  # 4 vertices; not reached on real masks


def _n_vertices(poly: Polygon) -> int:
    return len(poly.exterior.coords) - 1


def _simplify_once(poly: Polygon, tolerance: float) -> Polygon:
    # Tolerance 0 still drops collinear points, e.g. along the 45-degree lines of staircases.
    simple = shapely.remove_repeated_points(poly.simplify(tolerance, preserve_topology=True))
    return simple if isinstance(simple, Polygon) and not simple.is_empty else poly


def _iou_with_crop(polygons: list[Polygon], crop: NDArray[Any], origin: tuple[int, int]) -> float:
    h, w = crop.shape
    local = [shapely.affinity.translate(p, -origin[0], -origin[1]) for p in polygons]
    raster = polygons_to_mask(local, h, w)
    union = np.count_nonzero(raster | crop)
    return np.count_nonzero(raster & crop) / union if union else 1.0


def ring_to_flat(ring: Iterable[Sequence[float]] | Sequence[float] | NDArray[Any]) -> list[float]:
    """(N, 2) xy or flat xy, open or closed, to a flat COCO ring (no closing point)."""
    xy: NDArray[np.float64] = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    return [float(v) for v in xy.ravel()]


def polygons_to_mask(polygons: Iterable[PolygonLike], height: int, width: int) -> NDArray[Any]:
    """Rasterise polygons exactly as pycocotools does (``frPyObjects`` + ``decode``).

    Exteriors are unioned, and each polygon's holes are cut from its own exterior.

    Args:
        polygons: shapely Polygons / MultiPolygons (holes honoured), flat COCO rings, or (N, 2)
            xy arrays, in the pixel-edge frame.
        height: mask height in pixels.
        width: mask width in pixels.

    Returns:
        (height, width) bool mask.
    """
    out = np.zeros((height, width), dtype=bool)
    for item in polygons:
        if isinstance(item, MultiPolygon):
            out |= polygons_to_mask(item.geoms, height, width)
        elif isinstance(item, Polygon):
            if item.is_empty:
                continue
            inside = _rasterise([ring_to_flat(item.exterior.coords)], height, width)
            if item.interiors:
                holes = [ring_to_flat(h.coords) for h in item.interiors]
                inside &= ~_rasterise(holes, height, width)
            out |= inside
        else:
            out |= _rasterise([ring_to_flat(item)], height, width)
    return out


def _rasterise(rings: list[list[float]], height: int, width: int) -> NDArray[Any]:
    # pycocotools reads a 4-number list as a bbox, and rings need 3 points: drop degenerate ones.
    rings = [r for r in rings if len(r) >= 6]
    if not rings:
        return np.zeros((height, width), dtype=bool)
    rles = coco_mask.frPyObjects(rings, height, width)
    drawn: NDArray[np.bool_] = coco_mask.decode(coco_mask.merge(rles)).astype(bool)
    return drawn
