"""Masks <-> polygons: round-trip IoU per shape, holes, parts, and agreement with pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import coco_raster, disc, iou
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
    return shapes


SHAPES = _shapes()


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


def test_parts_touching_at_a_corner_are_separate() -> None:
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = True
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    np.testing.assert_array_equal(polygons_to_mask(polygons, 6, 6), mask)


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
        ({"mask": np.zeros((4, 4)), "tolerance_px": -1}, "tolerance_px"),
        ({"mask": np.zeros((4, 4)), "max_vertices": 2}, "max_vertices"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mask_to_polygons(**kwargs)
