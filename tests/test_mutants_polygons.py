"""Polygon guarantees that the mutation run of ``converters/polygons.py`` found untested.

The older tests check that outlines rasterise back to the mask, which a pixel-edge outline (no
corners cut) or a coarser simplification also does. These state the shape of the outline
itself: the iso-0.5 contour, checked against scikit-image's marching squares as an independent
oracle; how far simplification and the vertex cap may move it; and the small helpers
(``ring_to_flat``, ``polygons_to_mask``) on the inputs the older tests did not give them.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from helpers import coco_raster, disc, iou
from scipy import ndimage
from shapely.geometry import MultiPolygon, Polygon
from skimage import measure

from ovss_label.converters import mask_to_polygons, polygons_to_mask, ring_to_flat

H, W = 120, 160
YY, XX = np.mgrid[:H, :W]


def _mask(h: int, w: int, pixels: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[tuple(np.transpose(pixels))] = True
    return mask


def marching_squares(mask: np.ndarray) -> Polygon:
    """The iso-0.5 contour of a one-part mask by scikit-image, in the pixel-corner frame.

    ``fully_connected="high"`` joins pixels that touch at a corner, as 8-connected parts are;
    contours are in (row, col) of pixel centres, so x = col + 0.5 and y = row + 0.5.
    """
    contours = measure.find_contours(np.pad(mask.astype(float), 1), 0.5, fully_connected="high")
    rings = sorted((Polygon(c[:, ::-1] - 0.5) for c in contours), key=lambda p: -p.area)
    shell, *holes = rings  # one part: the largest ring is its exterior
    return Polygon(shell.exterior, [h.exterior for h in holes])


# ---- the unsimplified outline is the iso-0.5 contour -------------------------------------


def _one_pixel_wide() -> dict[str, np.ndarray]:
    """Parts whose every convex corner is a 1-px step: their outline is marching squares'."""
    shapes = {
        "speck": _mask(9, 9, [(2, 2)]),
        "domino": _mask(9, 9, [(2, 2), (2, 3)]),
        "bar": _mask(8, 12, [(3, c) for c in range(2, 10)]),
        "vertical bar": _mask(12, 8, [(r, 3) for r in range(2, 10)]),
        "diagonal chain": _mask(10, 10, [(i, i) for i in range(1, 8)]),
        "anti-diagonal chain": _mask(10, 10, [(i, 8 - i) for i in range(1, 8)]),
        "stairs": _mask(
            12, 12, [(2 + i, c) for i in range(4) for c in range(2 + 2 * i, 5 + 2 * i)]
        ),
    }
    yy, xx = np.mgrid[:12, :12]
    shapes["diagonal loop"] = np.abs(xx - 6) + np.abs(yy - 6) == 4  # a hole inside
    shapes["checkerboard"] = ((xx + yy) % 2 == 0) & (xx >= 2) & (xx < 10) & (yy >= 2) & (yy < 10)
    return shapes


ONE_PIXEL_WIDE = _one_pixel_wide()


@pytest.mark.parametrize("name", ONE_PIXEL_WIDE)
def test_one_pixel_wide_parts_trace_to_the_marching_squares_contour(name: str) -> None:
    """Staircase steps and 1-px ends are cut through the edge midpoints (a 45-degree chain is
    a straight band, a speck a 0.5 px^2 diamond), corner contacts are necks. Planted: corners
    not cut (pixel-edge outline), a wrong edge direction, or ``< 1`` for the step length."""
    mask = ONE_PIXEL_WIDE[name]
    (polygon,) = mask_to_polygons(mask, tolerance_px=0, min_area=0)
    expected = marching_squares(mask)
    assert len(polygon.interiors) == len(expected.interiors)
    assert polygon.symmetric_difference(expected).area < 1e-9
    assert polygon.area == pytest.approx(expected.area)


def test_a_diagonal_chain_is_a_straight_band() -> None:
    """The point of cutting the steps: a 45-degree chain is 4 vertices, not 4 per pixel."""
    (polygon,) = mask_to_polygons(ONE_PIXEL_WIDE["diagonal chain"], tolerance_px=0, min_area=0)
    assert len(polygon.exterior.coords) - 1 == 4


@pytest.mark.parametrize("height", [2, 3])
def test_bars_two_pixels_wide_or_more_keep_sharp_corners(height: int) -> None:
    """Only steps of at most 1 px are cut: planted ``<= 2.0`` cuts the corners of a 2-px bar."""
    mask = np.zeros((10, 20), bool)
    mask[3 : 3 + height, 4:16] = True
    (polygon,) = mask_to_polygons(mask, tolerance_px=0, min_area=0)
    assert polygon.equals(shapely.box(4, 3, 16, 3 + height))
    assert polygon.area == mask.sum()


@pytest.mark.parametrize(
    ("name", "min_area"),
    [("speck", 0.5), ("domino", 1.0), ("domino", 1.5), ("bar", 7.5), ("diagonal chain", 6.5)],
)
def test_a_part_whose_iso_outline_reaches_min_area_keeps_it(name: str, min_area: float) -> None:
    """The pixel-edge outline is the fallback for parts whose iso-0.5 polygon falls short of
    ``min_area``; a polygon of exactly ``min_area`` (or more) does not. Planted ``> min_area``,
    ``area <= min_area`` or ``pixels - 1.5`` switched these parts to their pixel-edge outline."""
    mask = ONE_PIXEL_WIDE[name]
    expected = marching_squares(mask)
    assert expected.area >= min_area
    (polygon,) = mask_to_polygons(mask, tolerance_px=0, min_area=min_area)
    assert polygon.symmetric_difference(expected).area < 1e-9


# ---- simplification: how far the outline may move ---------------------------------------


def _unsimplified(mask: np.ndarray) -> list[Polygon]:
    return mask_to_polygons(mask, tolerance_px=0, min_area=0)


@pytest.mark.parametrize("radius", [20, 35, 50])
def test_the_default_tolerance_moves_outlines_by_at_most_one_pixel(radius: int) -> None:
    """The default is a 1-px Douglas-Peucker tolerance: planted 2.0 moved a disc's outline by
    2 px (round-trip IoU still above 0.98, so the older tests let it through)."""
    mask = disc(H, W, 80, 60, radius)
    (exact,) = _unsimplified(mask)
    (polygon,) = mask_to_polygons(mask)
    assert len(polygon.exterior.coords) < len(exact.exterior.coords)
    assert polygon.hausdorff_distance(exact) <= 1.0 + 1e-9


def _guarded(mask: np.ndarray, tolerance: float, min_iou: float) -> Polygon:
    """The documented IoU guard, from the public calls: the tolerance is halved (1/8 px, then
    0) until the part, simplified and rasterised by pycocotools, overlaps the mask enough."""
    while True:
        (candidate,) = mask_to_polygons(mask, tolerance_px=tolerance, min_iou=0.0)
        drawn = coco_raster([ring_to_flat(candidate.exterior.coords)], *mask.shape)
        if tolerance == 0 or iou(drawn, mask) >= min_iou:
            return candidate
        tolerance = tolerance / 2 if tolerance > 0.125 else 0.0


GUARDED = {
    # r = 15: at 1 px the IoU is 0.976, at 0.5 px 0.986. Off the diagonal (x0 != y0), so a
    # crop translated by the wrong origin would be judged wrongly.
    "disc": (XX[:48, :64] - 30) ** 2 + (YY[:48, :64] - 20) ** 2 <= 15**2,
    "diagonal band": np.abs(XX[:48, :64] - YY[:48, :64] - 5) <= 1,
}


@pytest.mark.parametrize("min_iou", [0.98, 1.0])
@pytest.mark.parametrize("name", GUARDED)
def test_the_iou_guard_halves_the_tolerance_until_the_overlap_is_enough(
    name: str, min_iou: float
) -> None:
    """Planted: a third instead of a half, a first step straight to 0, ``> min_iou`` (an
    exact raster refused at ``min_iou=1``), or the crop moved by (y0, y0) before the IoU."""
    mask = GUARDED[name]
    (polygon,) = mask_to_polygons(mask, min_iou=min_iou)
    assert polygon.equals_exact(_guarded(mask, 1.0, min_iou), 0)


def test_the_disc_needs_the_guard() -> None:
    """The case above is not vacuous: 1 px falls short of 0.98, and the answer is 0.5 px."""
    mask = GUARDED["disc"]
    (coarse,) = mask_to_polygons(mask, min_iou=0.0)
    assert iou(polygons_to_mask([coarse], 48, 64), mask) < 0.98
    (polygon,) = mask_to_polygons(mask)
    (half,) = mask_to_polygons(mask, tolerance_px=0.5, min_iou=0.0)
    assert polygon.equals_exact(half, 0)


SPECKS = {  # one 1-px-wide part each, in a bounding box of 4 x 4 = 16 pixels
    "zigzag": np.array([[0, 1, 0, 1], [1, 0, 1, 0], [1, 1, 0, 1], [0, 1, 0, 0]], bool),
    "loop": np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 0]], bool),
}


@pytest.mark.parametrize("name", SPECKS)
def test_parts_in_a_box_of_16_pixels_are_not_simplified(name: str) -> None:
    """Specks keep their shape: at the default tolerance a part whose bounding box has at most
    16 pixels is its exact iso-0.5 outline (marching squares). Planted ``< 16``, or tolerance
    1 for them, simplified it (still exact when rasterised, so the IoU guard let it pass)."""
    mask = np.pad(SPECKS[name], 2)
    (polygon,) = mask_to_polygons(mask, min_area=0)
    assert polygon.symmetric_difference(marching_squares(mask)).area < 1e-9


# ---- the vertex cap ----------------------------------------------------------------------


def test_a_vertex_cap_of_4_is_accepted() -> None:
    """4 is the documented minimum (planted ``<= 4`` or ``< 5`` refused it)."""
    (polygon,) = mask_to_polygons(disc(H, W, 80, 60, 30), max_vertices=4)
    assert len(polygon.exterior.coords) - 1 <= 4 and polygon.is_valid
    assert polygon.contains(shapely.Point(80.5, 60.5))


def test_a_polygon_that_fits_the_cap_is_not_simplified_further() -> None:
    """A polygon with exactly ``max_vertices`` vertices is within the cap: planted ``<`` sent it
    through the cap's own simplification, losing vertices it was allowed to keep."""
    mask = disc(H, W, 80, 60, 20)
    (exact,) = _unsimplified(mask)
    n = len(exact.exterior.coords) - 1
    (capped,) = mask_to_polygons(mask, tolerance_px=0, min_area=0, max_vertices=n)
    assert capped.equals_exact(exact, 0)
    (capped,) = mask_to_polygons(mask, tolerance_px=0, min_area=0, max_vertices=n - 1)
    assert len(capped.exterior.coords) - 1 <= n - 1  # one fewer: the cap acts


def _first_fit(mask: np.ndarray, cap: int) -> Polygon:
    """The documented cap, from the public calls: the tolerance doubles from 0.5 px until the
    exterior has at most ``cap`` vertices."""
    tolerance = 0.5
    while True:
        (candidate,) = mask_to_polygons(mask, tolerance_px=tolerance, min_area=0, min_iou=0.0)
        if len(candidate.exterior.coords) - 1 <= cap:
            return candidate
        tolerance *= 2


CAPPED = {
    "disc": disc(H, W, 80, 60, 40),
    "wavy blob": np.hypot(XX - 80, YY - 60)
    <= 40 + 3 * np.sin(7 * np.arctan2(YY - 60, XX - 80)),  # no holes
}


@pytest.mark.parametrize("cap", [6, 12, 24, 60])
@pytest.mark.parametrize("name", CAPPED)
def test_the_vertex_cap_doubles_the_tolerance_from_half_a_pixel(name: str, cap: int) -> None:
    """The cap simplifies no more than it must: planted a start at 1.5 px or a factor of 3
    gave a coarser polygon than the first tolerance that fits."""
    mask = CAPPED[name]
    (polygon,) = mask_to_polygons(mask, tolerance_px=0, min_area=0, max_vertices=cap)
    assert polygon.equals_exact(_first_fit(mask, cap), 0)


def _speckled(seed: int) -> np.ndarray:
    """Smooth random blobs with 3% of the pixels flipped: pinholes hug every edge."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((48, 64)), 3)
    return (smooth > np.quantile(smooth, 0.6)) ^ (rng.random((48, 64)) < 0.03)


@pytest.mark.parametrize("cap", [4, 5])
def test_no_polygon_below_min_area_even_under_a_tight_vertex_cap(cap: int) -> None:
    """The cap may take area away (even from the pixel-edge fallback); a polygon that ends up
    below ``min_area`` is not written. Planted ``area > 0 or area >= min_area`` wrote one of
    17.5 px^2 at ``min_area=20``."""
    polygons = mask_to_polygons(_speckled(1), min_area=20, max_vertices=cap)
    assert polygons and min(p.area for p in polygons) >= 20


@pytest.mark.parametrize("cap", [4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_no_ring_repeats_a_vertex_under_the_vertex_cap(seed: int, cap: int) -> None:
    """A repeated vertex is a zero-length edge in every exported ring. Planted: duplicates of
    uncut corners left in the traced rings, which the cap's exterior-only step keeps in holes."""
    polygons = mask_to_polygons(_speckled(seed), max_vertices=cap)
    assert polygons
    for polygon in polygons:
        for ring in (polygon.exterior, *polygon.interiors):
            xy = np.asarray(ring.coords)
            assert (np.abs(np.diff(xy, axis=0)).sum(axis=1) > 0).all()


# ---- holes --------------------------------------------------------------------------------


def test_a_small_hole_meeting_the_outside_at_a_corner_is_filled() -> None:
    """Holes are 4-connected background: a 1-px hole that touches the outside only at a corner
    is still a hole, so ``min_area=2`` fills it. Planted 8-connected background (``connectivity``
    dropped) took it for outside and left it as a hole in the polygon."""
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    mask[5, 5] = mask[6, 6] = False  # (5, 5) meets the outside at (6, 6)'s corner only
    (polygon,) = mask_to_polygons(mask, tolerance_px=0, min_area=2)
    assert not polygon.interiors
    filled = mask.copy()
    filled[5, 5] = True
    np.testing.assert_array_equal(polygons_to_mask([polygon], 9, 9), filled)


def test_background_reaching_the_bounding_box_edge_is_never_filled() -> None:
    """Only enclosed background is a hole: a notch in the part's border stays empty even when
    ``min_area`` exceeds the whole outside of its bounding box. Planted: the outside label
    forgotten, so an outside smaller than ``min_area`` was filled like a hole."""
    mask = np.zeros((14, 14), bool)
    mask[2:12, 2:12] = True
    mask[2, 2] = mask[11, 6] = False  # 98 pixels; the outside of the 10 x 10 box is 46
    (polygon,) = mask_to_polygons(mask, tolerance_px=0, min_area=60)
    np.testing.assert_array_equal(polygons_to_mask([polygon], 14, 14), mask)


# ---- ring_to_flat and polygons_to_mask ----------------------------------------------------


@pytest.mark.parametrize(
    ("ring", "flat"),
    [
        ([(0, 0), (4, 0), (4, 3), (0, 0)], [0, 0, 4, 0, 4, 3]),  # closed: closing point dropped
        ([(0, 0), (4, 0), (4, 3)], [0, 0, 4, 0, 4, 3]),  # open: as is
        ([0, 0, 4, 0, 4, 3, 0, 0], [0, 0, 4, 0, 4, 3]),  # flat and closed
        (np.array([[1, 2], [5, 2], [5, 6], [1, 2]]), [1, 2, 5, 2, 5, 6]),  # ints in, floats out
        ([(3, 4)], [3, 4]),  # a single point is not a closed ring
        ([(3, 4), (3, 4)], [3, 4]),  # a point and its closing point
    ],
)
def test_ring_to_flat_drops_only_the_closing_point(ring, flat: list[float]) -> None:
    out = ring_to_flat(ring)
    assert out == flat and all(type(v) is float for v in out)


def test_polygons_to_mask_unions_every_kind_of_item() -> None:
    """MultiPolygons are unioned (holes honoured), an empty polygon is skipped, not the end of
    the list, and a flat ring after them adds to the mask. Planted ``=``/``&=`` in place of
    ``|=``, or ``break`` at the empty polygon, drew less."""
    first = shapely.box(2, 2, 12, 10)
    holed = Polygon([(20, 5), (60, 5), (60, 40), (20, 40)], [[(30, 15), (45, 15), (45, 30)]])
    multi = MultiPolygon([holed, shapely.box(70, 50, 90, 80)])
    flat = [100.0, 10.0, 140.0, 10.0, 120.0, 60.0]
    xy = np.array([[5.0, 90.0], [40.0, 90.0], [40.0, 110.0]])
    drawn = polygons_to_mask([first, multi, Polygon(), flat, xy], H, W)

    def raster(poly: Polygon) -> np.ndarray:
        inside = coco_raster([ring_to_flat(poly.exterior.coords)], H, W)
        for hole in poly.interiors:
            inside &= ~coco_raster([ring_to_flat(hole.coords)], H, W)
        return inside

    expected = raster(first) | raster(holed) | raster(shapely.box(70, 50, 90, 80))
    expected |= coco_raster([flat], H, W) | coco_raster([ring_to_flat(xy)], H, W)
    assert not expected[20, 40] and drawn.sum() == expected.sum()  # the hole is cut out
    np.testing.assert_array_equal(drawn, expected)
