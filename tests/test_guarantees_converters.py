"""Converter guarantees, each stated once and checked through the public calls (issue 18).

Every test here fails with a realistic one-line bug planted (named in its docstring) that the
older tests let through, and passes without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import disc

from ovss_label.backend.proposers import Proposal
from ovss_label.backend.proposers.postprocess import PostprocessConfig, proposal_to_instances
from ovss_label.backend.proposers.refine import RefineConfig, prompts_from_proposal
from ovss_label.converters import (
    CocoWriter,
    ExportReport,
    Instance,
    LabelmeWriter,
    TaskImage,
    YoloWriter,
    instance_to_results,
    mask_has_holes,
    mask_to_polygons,
    polygons_to_mask,
    read_coco,
    result_to_instance,
)

# ---- --min-area: a part of exactly the minimum is kept, one pixel less is dropped -------------

SIDE = 32
MIN_PX = 7
MIN_AREA = MIN_PX / (SIDE * SIDE)  # exact in floats: 7 px of a 32 x 32 image, no rounding


def _part(pixels: list[tuple[int, int]], dy: int, dx: int) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), bool)
    for r, c in pixels:
        mask[r + dy, c + dx] = True
    return mask


PART_SHAPES = {
    "bar": [(0, c) for c in range(MIN_PX)],
    "L": [(r, 0) for r in range(4)] + [(3, c) for c in range(1, MIN_PX - 3)],
    "diagonal chain": [(i, i) for i in range(MIN_PX)],  # 8-connected through corners only
}


def _min_and_one_less(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """A part of MIN_PX pixels and the same shape without its last pixel, far apart."""
    pixels = PART_SHAPES[shape]
    return _part(pixels, 2, 2), _part(pixels[:-1], 18, 18)


def _proposal(kept: np.ndarray, small: np.ndarray) -> Proposal:
    scores = np.zeros((2, SIDE, SIDE), np.float32)
    scores[0][kept], scores[1][small] = 0.9, 0.8
    return Proposal(("a", "b"), scores)


def _via_components(kept: np.ndarray, small: np.ndarray) -> list[np.ndarray]:
    config = PostprocessConfig(min_area=MIN_AREA)
    return [i.mask for i in proposal_to_instances(_proposal(kept, small), config)]


def _via_class_split(kept: np.ndarray, small: np.ndarray) -> list[np.ndarray]:
    config = PostprocessConfig(min_area=MIN_AREA, split="class")
    return [i.mask for i in proposal_to_instances(_proposal(kept, small), config)]


def _via_method_instances(kept: np.ndarray, small: np.ndarray) -> list[np.ndarray]:
    """Instances a method drew (SAM), resolved by score: a higher blob takes their overlap,
    so what is left of each is ``kept`` (MIN_PX pixels) or ``small`` (one fewer)."""
    blob = np.zeros((SIDE, SIDE), bool)
    blob[28:, :] = True
    methods = [Instance(blob, "blob", 0.9), Instance(blob | kept, "a", 0.5)]
    methods.append(Instance(blob | small, "b", 0.4))
    proposal = Proposal(("blob", "a", "b"), np.zeros((3, SIDE, SIDE), np.float32), None, methods)
    found = proposal_to_instances(proposal, PostprocessConfig(min_area=MIN_AREA))
    return [i.mask for i in found if i.label != "blob"]


def _via_polygon_regions(kept: np.ndarray, small: np.ndarray) -> list[np.ndarray]:
    instance = Instance(kept | small, "a")
    results = instance_to_results(instance, "polygon", min_area_fraction=MIN_AREA)
    return [result_to_instance(r).mask for r in results]  # type: ignore[union-attr]


def _via_mask_to_polygons(kept: np.ndarray, small: np.ndarray) -> list[np.ndarray]:
    polygons = mask_to_polygons(kept | small, min_area=MIN_PX)
    return [polygons_to_mask([p], SIDE, SIDE) for p in polygons]


def _via_sam_prompts(kept: np.ndarray, small: np.ndarray) -> list[np.ndarray]:
    prompts = prompts_from_proposal(_proposal(kept, small), RefineConfig(min_area=MIN_AREA))
    return [kept if kept[int(y), int(x)] else small for x, y in prompts.points[:, 0]]


MIN_AREA_PATHS: dict[str, Callable[[np.ndarray, np.ndarray], list[np.ndarray]]] = {
    "postprocess components": _via_components,
    "postprocess class split": _via_class_split,
    "method instances (overlaps)": _via_method_instances,
    "Label Studio polygon regions": _via_polygon_regions,
    "mask_to_polygons": _via_mask_to_polygons,
    "SAM refinement prompts": _via_sam_prompts,
}


@pytest.mark.parametrize("shape", PART_SHAPES)
@pytest.mark.parametrize("path", MIN_AREA_PATHS)
def test_min_area_keeps_exactly_the_minimum_and_drops_one_pixel_less(path: str, shape: str):
    """``--min-area`` means "at least": planted ``>`` for ``>=`` in any filter fails here."""
    kept, small = _min_and_one_less(shape)
    assert np.count_nonzero(kept) == MIN_PX and np.count_nonzero(small) == MIN_PX - 1
    found = MIN_AREA_PATHS[path](kept, small)
    assert len(found) == 1
    np.testing.assert_array_equal(found[0], kept)


# ---- polygons: holes survive the round trip, also under the vertex cap ---------------------

H, W = 120, 160
YY, XX = np.mgrid[:H, :W]
CX, CY, HOLE_R = 80, 60, 15


def _hole_masks() -> dict[str, np.ndarray]:
    hole = disc(H, W, CX, CY, HOLE_R)
    # Pinholes along a jagged edge hug the exterior: a topology-preserving simplification
    # cannot get under a small vertex cap, so the cap simplifies the exterior alone.
    jagged = disc(H, W, CX, CY, 50) & ~((XX + YY) % 5 == 0) | disc(H, W, CX, CY, 40)
    return {"annulus": disc(H, W, CX, CY, 45) & ~hole, "jagged annulus": jagged & ~hole}


HOLE_MASKS = _hole_masks()


@pytest.mark.parametrize("cap", [1000, 30, 8])
@pytest.mark.parametrize("tolerance", [0.0, 1.0])
@pytest.mark.parametrize("name", HOLE_MASKS)
def test_a_hole_stays_empty_after_tracing_simplifying_and_capping(
    name: str, tolerance: float, cap: int
):
    """A traced polygon keeps its hole: planted ``Polygon(shell.exterior)`` (holes dropped) in
    the vertex cap, or any other hole-dropping step, paints the hole in."""
    mask = HOLE_MASKS[name]
    polygons = mask_to_polygons(mask, tolerance_px=tolerance, max_vertices=cap)
    assert all(len(p.exterior.coords) - 1 <= cap for p in polygons)
    drawn = polygons_to_mask(polygons, H, W)
    # Simplification may move the hole's edge by its tolerance; its core stays empty.
    core = disc(H, W, CX, CY, HOLE_R - 4)
    assert not drawn[core].any()
    assert drawn[disc(H, W, CX, CY, 38) & ~disc(H, W, CX, CY, HOLE_R + 4)].all()  # not empty
    if tolerance == 0 and cap == 1000:
        np.testing.assert_array_equal(drawn, mask)  # exact without simplification


def test_holes_of_min_area_pixels_stay_and_smaller_ones_are_filled():
    """Holes are filled below ``min_area`` only: planted ``<=`` fills a hole of exactly it."""
    mask = np.zeros((20, 30), bool)
    mask[2:18, 2:28] = True
    mask[5, 5 : 5 + MIN_PX] = False  # a hole of MIN_PX pixels
    mask[12, 5 : 5 + MIN_PX - 1] = False  # one pixel smaller
    (polygon,) = mask_to_polygons(mask, tolerance_px=0, min_area=MIN_PX)
    expected = mask.copy()
    expected[12, 5 : 5 + MIN_PX - 1] = True
    np.testing.assert_array_equal(polygons_to_mask([polygon], 20, 30), expected)


def test_a_hole_is_background_not_4_connected_to_the_outside():
    """The parts contract (``converters.instance``): the image border is outside, and
    background that meets the outside only at a corner is enclosed. Found by mutmut: padding
    the border as mask, or 8-connected background, survived the older tests."""
    bar = np.zeros((9, 9), bool)
    bar[:, 4] = True  # splits the background in two, both touching the border: no hole
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False
    pinch = np.ones((5, 5), bool)
    pinch[3, 3] = pinch[4, 4] = False  # (3, 3) meets (4, 4), on the border, at a corner only
    for mask, holes in ((bar, False), (ring, True), (pinch, True)):
        assert mask_has_holes(mask) is holes and Instance(mask, "a").has_holes() is holes


# ---- Label Studio polygons: percent in [0, 100], borders exactly 0 and 100 -----------------

LS_H, LS_W = 90, 230  # not square, and both sides above 100 px


def _border_masks() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:LS_H, :LS_W]
    plus = ((yy >= 30) & (yy < 60)) | ((xx >= 100) & (xx < 140))
    return {"plus touching all four borders": plus, "whole image": np.ones((LS_H, LS_W), bool)}


@pytest.mark.parametrize("name", _border_masks())
def test_polygon_percent_points_are_in_range_and_borders_are_exactly_0_and_100(name: str):
    """Percent = pixel-edge x / W (y / H) x 100, clipped to [0, 100]; reading back scales
    first-clipped percent to pixels. Planted clipping on the wrong side of the scaling (pixels
    clipped to 100, or percent computed from clipped pixels) moves the right border."""
    mask = _border_masks()[name]
    (result,) = instance_to_results(Instance(mask, "a"), "polygon", tolerance_px=0)
    points = np.array(result["value"]["points"])
    assert points.min() == 0.0 and points.max() == 100.0
    assert {0.0, 100.0} <= set(points[:, 0]) and {0.0, 100.0} <= set(points[:, 1])
    # The contract, from the traced pixel-edge ring: x% = x px * 100 / W, y% = y px * 100 / H.
    (polygon,) = mask_to_polygons(mask, tolerance_px=0)
    ring = np.asarray(polygon.exterior.coords)[:-1]
    np.testing.assert_allclose(points, ring * [100 / LS_W, 100 / LS_H], rtol=0, atol=1e-6)
    back = result_to_instance(result)
    assert back is not None and back.polygons is not None
    np.testing.assert_array_equal(back.mask, mask)
    np.testing.assert_allclose(back.polygons[0], ring, rtol=0, atol=1e-3)
    assert back.polygons[0].max(axis=0).tolist() == [LS_W, LS_H]  # W and H px, not 100


def test_percent_points_outside_0_100_are_clipped_to_the_image_border():
    """Label Studio's editor can store points a little outside the image: they read back on
    the border, at W and H pixels (not at 100 px)."""
    result = {
        "type": "polygonlabels",
        "original_width": LS_W,
        "original_height": LS_H,
        "value": {"points": [[-2.5, -1], [103, 0], [100.5, 104], [0, 101]], "polygonlabels": ["a"]},
    }
    instance = result_to_instance(result)
    assert instance is not None and instance.polygons is not None and instance.mask.all()
    corners = [[0, 0], [LS_W, 0], [LS_W, LS_H], [0, LS_H]]
    np.testing.assert_array_equal(instance.polygons[0], corners)


def test_vector_vertices_outside_the_image_are_written_inside_0_100():
    """An imported polygon (COCO, Label Studio) may overhang the image; its own vertices are
    written, clipped to the border. Planted: the clip dropped."""
    ring = np.array([[-3.0, -2.0], [LS_W + 4.5, 10.0], [LS_W + 1.0, LS_H + 2.0], [5.0, LS_H]])
    mask = polygons_to_mask([ring], LS_H, LS_W)
    instance = Instance(mask, "a", polygons=(ring,), kind="polygon")
    (result,) = instance_to_results(instance, "polygon")
    points = np.array(result["value"]["points"])
    assert points.min() >= 0.0 and points.max() <= 100.0
    x5, y10 = round(100 * 5 / LS_W, 6), round(100 * 10 / LS_H, 6)
    expected = [[0.0, 0.0], [100.0, y10], [100.0, 100.0], [x5, 100.0]]
    np.testing.assert_array_equal(points, expected)


# ---- Files are read and written as UTF-8 whatever the locale -----------------------------------


def write_and_read(out: Path) -> list[str]:
    """Writes one image with the label "猫" as YOLO, LabelMe and (raw UTF-8, as other tools
    write it) COCO under ``out``; returns the categories ``read_coco`` reads back."""
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    image = TaskImage("task 1", 1, "a.png", "a.png", 8, 8, [("r", Instance(mask, "猫"))])
    for writer in (YoloWriter(out / "y", ["猫"]), LabelmeWriter(out / "l")):
        writer.add(image, ExportReport())
        writer.close()
    coco = CocoWriter(["猫"])
    coco.add_instance(coco.add_image("a.png", 8, 8), Instance(mask, "猫"))
    text = json.dumps(coco.to_dict(), ensure_ascii=False)
    (out / "c.json").write_text(text, encoding="utf-8")
    return read_coco(out / "c.json")[0]


_CHILD = """
import sys
sys.path[:0] = {path!r}
import warnings
from pathlib import Path
from test_guarantees_converters import write_and_read
warnings.simplefilter("error", EncodingWarning)  # after the imports: cv2 opens its own config
print(write_and_read(Path({out!r})))
"""


def test_writers_and_the_coco_reader_use_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """Bug: ``write_text``/``open`` without ``encoding``, i.e. the locale's (cp1252 on Windows,
    which cannot hold "猫"). Python warns (EncodingWarning, PEP 597) at each such call when
    ``-X warn_default_encoding`` is on; a child process turns the warnings on and into errors
    and writes what this process writes, importing what this test imports."""
    assert write_and_read(tmp_path / "here") == ["猫"]
    script = _CHILD.format(path=sys.path, out=str(tmp_path / "child"))
    child = [sys.executable, "-X", "warn_default_encoding", "-c", script]
    done = subprocess.run(child, capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['猫']"  # read back by read_coco
    files = sorted(p.relative_to(tmp_path / "here") for p in (tmp_path / "here").rglob("*.*"))
    assert len(files) == 4  # data.yaml, labels/a.txt, a.json, c.json
    for name in files:
        assert (tmp_path / "child" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()
    assert "猫" in (tmp_path / "here" / "y" / "data.yaml").read_text(encoding="utf-8")
