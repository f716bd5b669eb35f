"""Label Studio results <-> instances: every region type, its frame, and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import (
    LABEL_CONFIG,
    coco_raster,
    disc,
    fill_holes,
    iou,
    load_export,
    sdk_alpha,
    source_mask,
)
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.label_interface import LabelInterface
from scipy import ndimage
from shapely.geometry import Polygon

from ovss_label.converters import (
    Instance,
    RegionError,
    instance_to_results,
    instances_to_results,
    rectangle_corners,
    result_to_instance,
)

H, W = 48, 64


def _brush(mask: np.ndarray, label: str = "cat", **extra: object) -> dict:
    return {
        "id": "r1",
        "type": "brushlabels",
        "from_name": "brush",
        "to_name": "image",
        "original_width": mask.shape[1],
        "original_height": mask.shape[0],
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": [label],
        },
        **extra,
    }


def test_brush_result_decodes_to_the_sdk_mask() -> None:
    mask = disc(H, W, 30, 20, 11) & ~disc(H, W, 30, 20, 4)
    inst = result_to_instance(_brush(mask, score=0.8))
    assert inst is not None and inst.label == "cat" and inst.score == 0.8 and inst.kind == "mask"
    np.testing.assert_array_equal(inst.mask, mask)
    assert inst.has_holes()


def test_polygon_result_uses_percent_of_original_size() -> None:
    points = [[10.0, 12.5], [60.0, 12.5], [60.0, 87.5], [35.0, 50.0], [10.0, 87.5]]
    result = {
        "type": "polygonlabels",
        "original_width": W,
        "original_height": H,
        "value": {"points": points, "polygonlabels": ["tree"], "closed": True},
    }
    inst = result_to_instance(result)
    assert inst is not None and inst.kind == "polygon"
    ring = [c for x, y in points for c in (x * W / 100, y * H / 100)]
    np.testing.assert_array_equal(inst.mask, coco_raster([ring], H, W))
    np.testing.assert_allclose(inst.polygons[0], np.reshape(ring, (-1, 2)))


def test_rectangle_rotation_is_about_the_top_left_corner() -> None:
    value = {"x": 50.0, "y": 25.0, "width": 25.0, "height": 25.0, "rotation": 90.0}
    corners = rectangle_corners(value, H, W)
    # 16 px wide, 12 px high, turned 90 degrees clockwise (y down) about (32, 12).
    np.testing.assert_allclose(corners, [[32, 12], [32, 28], [20, 28], [20, 12]], atol=1e-9)
    result = {
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "value": {**value, "rectanglelabels": ["car"]},
    }
    inst = result_to_instance(result)
    assert inst is not None and inst.kind == "box" and inst.area == 16 * 12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_rotation": 90}, "image_rotation=90"),
        ({"original_width": None}, "original_width"),
        ({"value": {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["cat"]}}, "undecodable"),
        ({"value": {"format": "rle", "rle": [0], "brushlabels": []}}, "no label"),
        ({"value": {"format": "points", "points": [], "brushlabels": ["cat"]}}, "not supported"),
    ],
)
def test_bad_regions_raise_region_error_with_their_id(change: dict, message: str) -> None:
    result = _brush(disc(H, W, 10, 10, 4)) | change
    with pytest.raises(RegionError, match=message) as info:
        result_to_instance(result)
    assert info.value.region_id == "r1"


def test_too_few_polygon_points() -> None:
    result = {
        "id": "p",
        "type": "polygonlabels",
        "original_width": W,
        "original_height": H,
        "value": {"points": [[1, 1], [2, 2]], "polygonlabels": ["tree"]},
    }
    with pytest.raises(RegionError, match="2 points"):
        result_to_instance(result)


def test_non_region_results_are_not_instances() -> None:
    assert result_to_instance({"type": "textarea", "value": {"text": ["x"]}}) is None
    assert result_to_instance({"type": "choices", "value": {"choices": ["a"]}}) is None


def test_instance_to_brush_result_is_exact_and_valid() -> None:
    mask = disc(H, W, 30, 20, 11) & ~disc(H, W, 30, 20, 4)
    (result,) = instance_to_results(Instance(mask, "dog", 0.9), "brush")
    assert result["value"]["rle"] == mask2rle(mask.astype(np.uint8) * 255)
    assert (result["original_width"], result["original_height"]) == (W, H)
    np.testing.assert_array_equal(sdk_alpha(result["value"]["rle"], H, W) > 0, mask)
    assert result["score"] == 0.9 and result["value"]["brushlabels"] == ["dog"]


def test_polygon_results_one_per_part_in_percent() -> None:
    mask = np.zeros((H, W), bool)
    mask[4:20, 8:24] = True
    mask[30:40, 40:60] = True
    results = instance_to_results(Instance(mask, "cat"), "polygon")
    assert len(results) == 2
    square = sorted(map(tuple, results[0]["value"]["points"]))
    expected = sorted(
        [(12.5, 100 * 4 / 48), (37.5, 100 * 4 / 48), (12.5, 100 * 20 / 48), (37.5, 100 * 20 / 48)]
    )
    np.testing.assert_allclose(square, expected, atol=1e-4)  # rounded to 4 decimals
    back = result_to_instance(results[0] | {"type": "polygonlabels"})
    assert back is not None and back.area == 16 * 16


def _polygon_area_px(result: dict) -> float:
    """Shapely area in pixels of a polygonlabels result (percent points scaled back)."""
    scale = [result["original_width"] / 100, result["original_height"] / 100]
    return float(Polygon(np.array(result["value"]["points"]) * scale).area)


def _speckled_blobs(seed: int) -> np.ndarray:
    """Smooth random blobs with 3% of the pixels flipped: specks and corner contacts."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((H, W)), 3)
    return (smooth > np.quantile(smooth, 0.6)) ^ (rng.random((H, W)) < 0.03)


def _corner_touching() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:H, :W]
    squares = ((xx >= 4) & (xx < 20) & (yy >= 4) & (yy < 20)) | (
        (xx >= 20) & (xx < 40) & (yy >= 20) & (yy < 40)
    )
    return {
        "diagonal chain": (xx == yy + 10) & (yy >= 5) & (yy < 40),
        "squares touching at a corner": squares,
        "X": ((xx - 30 == yy - 24) | (xx - 30 == 24 - yy)) & (np.abs(yy - 24) <= 15),
        "checkerboard": ((xx + yy) % 2 == 0) & (xx >= 40) & (xx < 56) & (yy >= 8) & (yy < 24),
    }


CORNER_TOUCHING = _corner_touching()


@pytest.mark.parametrize("name", CORNER_TOUCHING)
def test_corner_touching_pixels_give_one_polygon_region(name: str) -> None:
    mask = CORNER_TOUCHING[name]
    (result,) = instance_to_results(Instance(mask, "cat"), "polygon")
    assert iou(source_mask(result), fill_holes(mask)) >= 0.98  # exterior only: holes filled


@pytest.mark.parametrize("seed", range(3))
def test_one_polygon_region_per_part_and_none_below_min_area(seed: int) -> None:
    """Instances split into 8-connected parts of >= min_area pixels give one region each."""
    mask, fraction = _speckled_blobs(seed), 0.002
    min_px = math.ceil(fraction * H * W)  # 7 px of 48 x 64
    labels, count = ndimage.label(mask, np.ones((3, 3), bool))  # independent 8-connected split
    parts = [labels == i for i in range(1, count + 1)]
    instances = [Instance(part, "cat") for part in parts if part.sum() >= min_px]
    assert len(instances) < len(parts)  # some specks were dropped as instances
    assert len(instances_to_results(instances, "polygon")) == len(instances)
    results = instances_to_results(instances, "polygon", min_area_fraction=fraction)
    assert len(results) == len(instances)
    assert min(_polygon_area_px(r) for r in results) >= fraction * H * W
    # A whole-class mask (specks included) gives the same regions: each part is filtered.
    whole = instance_to_results(Instance(mask, "cat"), "polygon", min_area_fraction=fraction)
    assert sorted(r["id"] for r in whole) == sorted(r["id"] for r in results)


def test_polygon_min_area_fraction_counts_pixels_of_the_image() -> None:
    mask = np.zeros((H, W), bool)
    mask[10, 10:17] = True  # a 7-px bar: its iso-0.5 outline is 6.5 px^2
    fraction = 7 / (H * W)  # exactly 7 pixels
    (result,) = instance_to_results(Instance(mask, "cat"), "polygon", min_area_fraction=fraction)
    assert _polygon_area_px(result) >= 7 and np.array_equal(source_mask(result), mask)
    bigger = 8 / (H * W)
    assert instance_to_results(Instance(mask, "cat"), "polygon", min_area_fraction=bigger) == []
    (brush,) = instance_to_results(Instance(mask, "cat"), "brush", min_area_fraction=bigger)
    assert brush["type"] == "brushlabels"  # brush results are exact, never filtered
    with pytest.raises(ValueError, match="fraction"):
        instance_to_results(Instance(mask, "cat"), "polygon", min_area_fraction=7.0)


def test_vector_instances_keep_their_own_vertices() -> None:
    ring = np.array([[3.25, 4.5], [40.0, 4.5], [22.0, 30.75]])
    inst = Instance(
        coco_raster([ring.ravel().tolist()], H, W), "tree", polygons=(ring,), kind="polygon"
    )
    (result,) = instance_to_results(inst, "polygon")
    np.testing.assert_allclose(
        np.array(result["value"]["points"]) * [W / 100, H / 100], ring, atol=1e-3
    )


def test_box_instances_become_rectangles_and_round_trip() -> None:
    value = {"x": 20.0, "y": 50.0, "width": 30.0, "height": 20.0, "rotation": 30.0}
    result = {
        "type": "rectanglelabels",
        "original_width": W,
        "original_height": H,
        "value": {**value, "rectanglelabels": ["car"]},
    }
    inst = result_to_instance(result)
    assert inst is not None
    (back,) = instance_to_results(inst, "both")
    assert back["type"] == "rectanglelabels" and back["from_name"] == "bbox"
    for key, expected in value.items():
        assert math.isclose(back["value"][key], expected, abs_tol=1e-3)


def test_both_kinds_and_empty_masks() -> None:
    insts = [Instance(disc(H, W, 20, 20, 8), "cat"), Instance(np.zeros((H, W), bool), "dog")]
    results = instances_to_results(insts, "both")
    assert [r["type"] for r in results] == ["brushlabels", "polygonlabels"]
    with pytest.raises(ValueError, match="kind"):
        instance_to_results(insts[0], "mask")  # type: ignore[arg-type]


def test_region_ids_are_deterministic_and_distinct() -> None:
    a = instance_to_results(Instance(disc(H, W, 20, 20, 8), "cat"), "both")
    b = instance_to_results(Instance(disc(H, W, 20, 20, 8), "cat"), "both")
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["id"] for r in a}) == 2


@pytest.mark.parametrize("names", [("brush", "cat"), ("b'r\"sh", "Ünï 猫"), ("", "")])
def test_brush_ids_are_region_id_of_the_rle_list(names: tuple[str, str]) -> None:
    """Brush ids hash numpy-built text; it must be ``repr`` of the list, whatever the names."""
    from ovss_label.converters.labelstudio import _uint8_list_repr, region_id

    rng = np.random.default_rng(0)
    for values in ([], [0], [255, 7, 10, 100], rng.integers(0, 256, 5000).tolist()):
        assert _uint8_list_repr(np.array(values, np.uint8)) == repr(values).encode()
    noisy = rng.random((H, W)) < 0.4  # many runs: a long RLE with values of every width
    for mask in (noisy, disc(H, W, 20, 20, 8)):
        (result,) = instance_to_results(Instance(mask, names[1]), brush_name=names[0])
        assert result["id"] == region_id(names[0], names[1], result["value"]["rle"])


def test_predictions_validate_against_the_label_config() -> None:
    interface = LabelInterface(LABEL_CONFIG.read_text())
    insts = [
        Instance(disc(H, W, 20, 20, 8), "cat", 0.7),
        Instance(disc(H, W, 40, 30, 6), "car", 0.5),
    ]
    brush = instance_to_results(insts[0], "brush")
    polygon = instance_to_results(insts[1], "polygon")
    prediction = {"model_version": "t", "score": 0.6, "result": brush + polygon}
    assert interface.validate_prediction(prediction)
    bad = instance_to_results(Instance(disc(H, W, 20, 20, 8), "zebra"), "brush")
    assert not interface.validate_prediction({"model_version": "t", "result": bad})


def test_fixture_regions_match_independent_decoding() -> None:
    for task in load_export():
        for record in task["annotations"]:
            for result in record["result"]:
                if result["type"] != "brushlabels" or "original_width" not in result:
                    continue
                try:
                    inst = result_to_instance(result)
                except RegionError:
                    continue
                expected = sdk_alpha(result["value"]["rle"], inst.height, inst.width) > 0
                assert iou(inst.mask, expected) == 1.0
