"""Masks <-> polygons: round-trip IoU per shape, holes, 8-connected parts, min area, pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from helpers import coco_raster, disc, fill_holes, iou
from scipy import ndimage
from shapely.geometry import Polygon

from ovss_label.converters import mask_to_polygons, polygons_to_mask, ring_to_flat

H, W = 120, 160
YY, XX = np.mgrid[:H, :W]


def _shapes() -> dict[str, np.ndarray]:
    shapes = {
        "small disc": disc(H, W, 50, 60, 6),
        "disc": disc(H, W, 80, 60, 35),
        "ring": disc(H, W, 80, 60, 40) & ~disc(H, W, 80, 60, 18),
        "thin bar 1px": (YY == 30) & (XX >= 10) & (XX < 150),
        "thin bar 2px vertical": (XX >= 70) & (XX < 72) & (YY >= 5) & (YY < 115),
        "diagonal band": np.abs(XX - YY - 20) <= 1,
        "several parts": disc(H, W, 25, 25, 15)
        | disc(H, W, 120, 80, 22)
        | ((XX > 60) & (XX < 90) & (YY > 90) & (YY < 110)),
        "touching border": (XX < 40) | (YY >= 100) | disc(H, W, W, 0, 30),
        "whole image": np.ones((H, W), bool),
    }
    blob = np.zeros((H, W), bool)
    blob[20:100, 30:130] = True
    blob &= ~((XX - 80) ** 2 / 900 + (YY - 60) ** 2 / 300 < 1)  # elliptic hole
    blob[45:75, 70:90] |= True  # island inside the hole: a second part
    shapes["island in a hole"] = blob
    shapes.update(CORNER_TOUCHING)
    return shapes


def _corner_touching() -> dict[str, np.ndarray]:
    """One 8-connected part each, whose pixels meet only at corners somewhere."""
    diagonal = (XX == YY + 30) & (YY >= 10) & (YY < 60)  # 1-px staircase, pixels touch at corners
    squares = ((XX >= 20) & (XX < 50) & (YY >= 10) & (YY < 40)) | (
        (XX >= 50) & (XX < 90) & (YY >= 40) & (YY < 70)
    )
    cross = ((XX - 80 == YY - 60) | (XX - 80 == 60 - YY)) & (np.abs(YY - 60) <= 25)  # an "X"
    checker = ((XX + YY) % 2 == 0) & (XX >= 100) & (XX < 120) & (YY >= 20) & (YY < 36)
    diamond = np.abs(XX - 40) + np.abs(YY - 90) == 12  # a closed diagonal loop around a hole
    return {
        "diagonal chain": diagonal,
        "squares touching at a corner": squares,
        "X": cross,
        "checkerboard": checker,
        "diagonal loop": diamond,
    }


CORNER_TOUCHING = _corner_touching()
SHAPES = _shapes()
EIGHT = np.ones((3, 3), bool)  # scipy's structure for 8-connected labelling: the test oracle


def _speckled_blobs(seed: int) -> np.ndarray:
    """Smooth random blobs with 3% of the pixels flipped: specks, pinholes, corner contacts."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((H, W)), 4)
    return (smooth > np.quantile(smooth, 0.6)) ^ (rng.random((H, W)) < 0.03)


@pytest.mark.parametrize("name", SHAPES)
def test_round_trip_iou_at_default_tolerance(name: str) -> None:
    mask = SHAPES[name]
    polygons = mask_to_polygons(mask)
    assert iou(polygons_to_mask(polygons, H, W), mask) >= 0.98


@pytest.mark.parametrize("name", SHAPES)
def test_unsimplified_outlines_are_exact(name: str) -> None:
    mask = SHAPES[name]
    polygons = mask_to_polygons(mask, tolerance_px=0, min_area=0)
    np.testing.assert_array_equal(polygons_to_mask(polygons, H, W), mask)


def test_topology_parts_and_holes() -> None:
    polygons = mask_to_polygons(SHAPES["ring"])
    assert len(polygons) == 1 and len(polygons[0].interiors) == 1
    assert len(mask_to_polygons(SHAPES["several parts"])) == 3
    island = mask_to_polygons(SHAPES["island in a hole"])
    assert [len(p.interiors) for p in island] == [1, 0]  # largest first
    for p in island:
        assert p.is_valid and p.exterior.is_ccw and all(not h.is_ccw for h in p.interiors)


def test_pixels_touching_at_a_corner_are_one_polygon() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True
    (poly,) = mask_to_polygons(mask, min_area=0)
    assert poly.is_valid and poly.exterior.is_simple  # a neck, not a ring pinched at (2, 2)
    assert poly.distance(shapely.Point(2, 2)) == 0
    np.testing.assert_array_equal(polygons_to_mask([poly], 6, 6), mask)


@pytest.mark.parametrize("name", CORNER_TOUCHING)
def test_corner_touching_shapes_are_one_polygon(name: str) -> None:
    mask = CORNER_TOUCHING[name]
    assert ndimage.label(mask, EIGHT)[1] == 1
    for tolerance in (0.0, 1.0, 3.0):
        (poly,) = mask_to_polygons(mask, tolerance_px=tolerance)
        assert poly.is_valid and poly.exterior.is_simple
        exterior = polygons_to_mask([Polygon(poly.exterior)], H, W)  # what Label Studio keeps
        assert iou(exterior, fill_holes(mask)) >= 0.98, tolerance
    (exact,) = mask_to_polygons(mask, tolerance_px=0, min_area=0)
    np.testing.assert_array_equal(polygons_to_mask([exact], H, W), mask)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("min_area", [1, 8, 40])
def test_one_polygon_per_part_and_none_below_min_area(seed: int, min_area: float) -> None:
    mask = _speckled_blobs(seed)
    labels, _ = ndimage.label(mask, EIGHT)
    sizes = np.bincount(labels.ravel())[1:]
    polygons = mask_to_polygons(mask, min_area=min_area)
    assert len(polygons) == np.count_nonzero(sizes >= min_area)
    assert min(p.area for p in polygons) >= min_area  # shapely area, px^2
    assert all(p.is_valid for p in polygons)
    kept = np.isin(labels, 1 + np.flatnonzero(sizes >= min_area))
    drawn = polygons_to_mask(polygons, H, W)
    if min_area == 1:
        assert iou(drawn, kept) >= 0.98
    else:  # pinholes below min_area are filled: drawn lies between kept and kept without holes
        assert np.count_nonzero(drawn & kept) >= 0.98 * np.count_nonzero(kept)
        assert np.count_nonzero(drawn & fill_holes(kept)) >= 0.98 * np.count_nonzero(drawn)


@pytest.mark.parametrize(
    ("pixels", "min_area"),
    [([(5, 5)], 1.0), ([(5, 5), (5, 6), (5, 7)], 3.0), ([(5, 5), (6, 6), (7, 7), (7, 8)], 4.0)],
)
def test_a_part_of_min_area_pixels_keeps_a_polygon_of_min_area(
    pixels: list[tuple[int, int]], min_area: float
) -> None:
    """The iso-0.5 outline of these parts is smaller than their pixel count (a 1-px speck is a
    0.5 px^2 diamond): their pixel-edge outline is written instead, exact when rasterised."""
    mask = np.zeros((12, 12), bool)
    mask[tuple(np.transpose(pixels))] = True
    (poly,) = mask_to_polygons(mask, min_area=min_area)
    assert poly.area >= min_area and poly.is_valid
    np.testing.assert_array_equal(polygons_to_mask([poly], 12, 12), mask)
    assert mask_to_polygons(mask, min_area=min_area + 1) == []


def test_rectangles_keep_sharp_corners() -> None:
    mask = np.zeros((50, 50), bool)
    mask[10:30, 5:45] = True
    (poly,) = mask_to_polygons(mask)
    assert sorted(poly.exterior.coords[:-1]) == [(5, 10), (5, 30), (45, 10), (45, 30)]


def test_min_area_drops_specks_and_fills_pinholes() -> None:
    mask = disc(H, W, 80, 60, 30)
    mask[60, 80] = False  # 1-px hole
    mask[5, 5] = mask[5, 6] = True  # 2-px speck
    polygons = mask_to_polygons(mask, min_area=3)
    assert len(polygons) == 1 and not polygons[0].interiors
    kept = mask_to_polygons(mask, min_area=1)
    assert len(kept) == 2 and len(kept[0].interiors) == 1


def test_vertex_cap() -> None:
    # A disc with a jagged edge and pinholes that hug it: hard to simplify with topology kept.
    mask = disc(H, W, 80, 60, 50) & ~((XX + YY) % 5 == 0) | disc(H, W, 80, 60, 40)
    uncapped = mask_to_polygons(mask, tolerance_px=0, min_area=0)
    assert max(len(p.exterior.coords) - 1 for p in uncapped) > 100
    for cap in (8, 30):
        polygons = mask_to_polygons(mask, tolerance_px=0, min_area=0, max_vertices=cap)
        assert polygons and all(len(p.exterior.coords) - 1 <= cap for p in polygons)


def test_polygons_to_mask_agrees_with_pycocotools() -> None:
    rng = np.random.default_rng(7)
    for _ in range(25):
        n = int(rng.integers(3, 12))
        ring = rng.uniform(-5, [W + 5, H + 5], size=(n, 2))  # also outside the image
        flat = ring_to_flat(ring)
        np.testing.assert_array_equal(polygons_to_mask([flat], H, W), coco_raster([flat], H, W))
        np.testing.assert_array_equal(polygons_to_mask([ring], H, W), coco_raster([flat], H, W))


def test_polygon_holes_are_cut_from_their_exterior() -> None:
    outer = [(10, 10), (90, 10), (90, 70), (10, 70)]
    hole = [(30, 30), (60, 30), (60, 50), (30, 50)]
    expected = coco_raster([ring_to_flat(outer)], H, W) & ~coco_raster([ring_to_flat(hole)], H, W)
    np.testing.assert_array_equal(polygons_to_mask([Polygon(outer, [hole])], H, W), expected)


def test_degenerate_rings_are_ignored_not_read_as_boxes() -> None:
    # pycocotools reads a 4-number list as a bbox; a 2-point ring must draw nothing.
    assert not polygons_to_mask([[1.0, 1.0, 50.0, 50.0]], H, W).any()
    assert not polygons_to_mask([], H, W).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask": np.zeros((2, 2, 2))}, "2-D"),
        ({"mask": np.zeros((4, 4)), "tolerance_px": -1}, r"^tolerance_px must be >= 0$"),
        (
            {"mask": np.zeros((4, 4)), "max_vertices": 2},
            r"^max_vertices must be at least 4 \(a ring needs 3 distinct points\)$",
        ),
        ({"mask": np.zeros((4, 4)), "min_area": -1}, r"^min_area must be >= 0 \(pixels\)$"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mask_to_polygons(**kwargs)
