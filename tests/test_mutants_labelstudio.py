"""Label Studio result items (``labelstudio``): guarantees that the converters' mutation run
(issue 18) found untested. What we write (fields Label Studio reads, region ids, rectangle
values) and what we read (label and format fallbacks, scores, the errors a bad result gives).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
from helpers import disc

from ovss_label.converters import (
    Instance,
    RegionError,
    instance_to_results,
    mask_to_brush_rle,
    polygons_to_mask,
    rectangle_corners,
    rectangle_value,
    result_to_instance,
)
from ovss_label.converters import labelstudio as labelstudio_module
from ovss_label.converters.labelstudio import region_label

H, W = 20, 40
SQUARE = np.zeros((H, W), bool)
SQUARE[4:12, 8:16] = True


def sized(kind: str, value: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A result item of ``kind`` on a W x H image."""
    return {"type": kind, "original_width": W, "original_height": H, "value": value} | fields


def box(corners: np.ndarray, label: str = "car", score: float | None = None) -> Instance:
    mask = polygons_to_mask([corners], H, W)
    return Instance(mask, label, score, polygons=(corners,), kind="box")


# Writing ------------------------------------------------------------------------------------


def test_results_are_editable_unrotated_regions_label_studio_can_draw() -> None:
    inst = Instance(SQUARE, "cat", score=0.5)
    brush, polygon = instance_to_results(inst, "both")
    for item in (brush, polygon):
        assert (item["image_rotation"], item["readonly"]) == (0, False)
    assert list(brush["value"]) == ["format", "rle", "brushlabels"]
    assert brush["value"]["format"] == "rle"
    assert polygon["value"]["closed"] is True and polygon["value"]["polygonlabels"] == ["cat"]


def test_region_ids_are_deterministic_and_tell_apart_label_control_and_geometry() -> None:
    # Results sharing an id are one region: different objects must never share one.
    def ids(inst: Instance, kind: Any = "polygon", **names: str) -> list[str]:
        return [r["id"] for r in instance_to_results(inst, kind, **names)]

    corners = rectangle_corners({"x": 10, "y": 10, "width": 20, "height": 30}, H, W)
    for inst, kind in ((Instance(SQUARE, "cat"), "polygon"), (box(corners, "cat"), "brush")):
        other = Instance(inst.mask, "dog", polygons=inst.polygons, kind=inst.kind)
        name = "polygon_name" if kind == "polygon" else "rectangle_name"
        assert ids(inst, kind) == ids(inst, kind)  # predictions files diff cleanly
        assert ids(inst, kind) != ids(other, kind)
        assert ids(inst, kind) != ids(inst, kind, **{name: "outline"})
    moved = box(corners + np.array([5.0, 0.0]), "cat")
    assert ids(box(corners, "cat"), "brush") != ids(moved, "brush")


def test_predicted_polygons_are_traced_at_one_pixel_like_the_export() -> None:
    ball = Instance(disc(96, 96, 48, 48, 44), "ball")
    default = instance_to_results(ball, "polygon")
    assert default == instance_to_results(ball, "polygon", tolerance_px=1.0)
    assert len(default[0]["value"]["points"]) == 20


@pytest.mark.parametrize(
    "value",
    [
        {"x": 12.5, "y": 7.25, "width": 30.75, "height": 40.5},  # percent keeps its decimals
        {"x": 50, "y": 20, "width": 20, "height": 40, "rotation": 30.5},
        {"x": 50, "y": 50, "width": 10, "height": 20, "rotation": 270},  # 270, not -90
    ],
)
def test_rectangle_values_round_trip_through_corners(value: dict) -> None:
    # Corners are snapped to 1/1000 px, hence the tolerance.
    back = rectangle_value(rectangle_corners(value, H, W), H, W)
    assert back == pytest.approx({"rotation": 0.0} | value, abs=0.01)


def test_rectangle_rotation_is_written_to_6_decimals() -> None:
    corners = [[4.0, 2.0], [7.0, 3.0], [6.0, 9.0], [3.0, 8.0]]  # atan2(1, 3): 18.4349488...
    assert rectangle_value(corners, H, W)["rotation"] == 18.434949


def test_an_unrotated_rectangle_has_axis_aligned_corners() -> None:
    for value in (
        {"x": 10, "y": 10, "width": 20, "height": 30},
        {"x": 10, "y": 10, "width": 20, "height": 30, "rotation": 0},
    ):
        corners = rectangle_corners(value, H, W)
        assert corners.tolist() == [[4.0, 2.0], [12.0, 2.0], [12.0, 8.0], [4.0, 8.0]]


# Reading ------------------------------------------------------------------------------------


def test_scores_of_predicted_polygons_and_rectangles_are_kept() -> None:
    triangle = sized(
        "polygonlabels", {"points": [[10, 10], [50, 10], [30, 60]], "polygonlabels": ["cat"]}
    )
    rectangle = sized(
        "rectanglelabels", {"x": 10, "y": 10, "width": 20, "height": 30, "rectanglelabels": ["car"]}
    )
    for item in (triangle, rectangle):
        inst = result_to_instance(item | {"score": 0.75})
        assert inst is not None and inst.score == 0.75
    assert result_to_instance(triangle) is not None  # 3 points make a polygon


def test_generic_labels_and_a_brush_without_format_are_read() -> None:
    rle = instance_to_results(Instance(SQUARE, "cat"))[0]["value"]["rle"]
    inst = result_to_instance(sized("brushlabels", {"rle": rle, "labels": ["cat"]}))
    assert inst is not None and inst.label == "cat" and np.array_equal(inst.mask, SQUARE)


def test_a_full_turn_is_no_rotation() -> None:
    points = {"points": [[10, 10], [50, 10], [30, 60]], "polygonlabels": ["cat"]}
    assert result_to_instance(sized("polygonlabels", points, image_rotation=360)) is not None
    message = r"image_rotation=90: .* whose coordinates cannot be mapped back; reset the rotation"
    with pytest.raises(RegionError, match=message + " in Label Studio and re-save$"):
        result_to_instance(sized("polygonlabels", points, image_rotation=90))


def test_bad_results_are_errors_that_say_why_and_name_the_region() -> None:
    rle = instance_to_results(Instance(SQUARE, "cat"))[0]["value"]["rle"]
    cases = [
        (
            sized("brushlabels", {"format": "png", "rle": rle, "brushlabels": ["cat"]}),
            r"brush format 'png' is not supported \(need 'rle'\)",
        ),
        (
            sized("polygonlabels", {"polygonlabels": ["cat"]}),
            "polygon has 0 points; at least 3 are needed",
        ),
        (
            sized("polygonlabels", {"points": "abc", "polygonlabels": ["cat"]}),
            "malformed polygonlabels result: ",
        ),
        (
            sized(
                "rectanglelabels",
                {"x": 1, "y": 1, "width": 0, "height": 25, "rectanglelabels": ["car"]},
            ),
            r"rectangle has no area \(0.00 x 5.00 px\)",
        ),
        (
            sized(
                "rectanglelabels",
                {"x": 1, "y": 1, "width": 25, "height": 0, "rectanglelabels": ["car"]},
            ),
            r"rectangle has no area \(10.00 x 0.00 px\)",
        ),
    ]
    for item, message in cases:
        with pytest.raises(RegionError, match=message) as caught:
            result_to_instance(item | {"id": "r7"})
        assert caught.value.region_id == "r7"


@pytest.mark.parametrize("bad", ["nan", "inf", float("-inf")])
def test_a_rectangle_with_a_rotation_that_is_not_finite_is_refused(bad: Any) -> None:
    value = {"x": 10, "y": 10, "width": 20, "height": 30, "rotation": bad}
    item = sized("rectanglelabels", value | {"rectanglelabels": ["car"]}, id="r8")
    message = r"^rectangle has a coordinate that is not a finite number$"
    with pytest.raises(RegionError, match=message) as caught:
        result_to_instance(item)
    assert caught.value.region_id == "r8"


def test_a_polygon_with_a_point_that_is_not_finite_is_refused() -> None:
    points = [[10, 10], [float("nan"), 20], [30, 60]]
    item = sized("polygonlabels", {"points": points, "polygonlabels": ["cat"]})
    with pytest.raises(RegionError, match=r"^polygon has a point that is not a finite number$"):
        result_to_instance(item)


def test_any_painted_brush_value_is_drawn() -> None:
    # Label Studio stores RGBA; a pixel is painted when its value is not 0, however faint.
    faint = SQUARE.astype(np.uint8)  # value 1 where painted
    rle = mask_to_brush_rle(faint)
    inst = result_to_instance(
        sized("brushlabels", {"format": "rle", "rle": rle, "brushlabels": ["cat"]})
    )
    assert inst is not None and np.array_equal(inst.mask, SQUARE)


def test_image_sizes_from_one_pixel_up_to_the_decoding_limit(monkeypatch) -> None:
    def square_on(width: Any, height: Any) -> dict[str, Any]:
        value = {"x": 0, "y": 0, "width": 100, "height": 100, "rectanglelabels": ["car"]}
        item = sized("rectanglelabels", value, id="r9")
        return item | {"original_width": width, "original_height": height}

    inst = result_to_instance(square_on(1, 5))  # a one-pixel-wide image is an image
    assert inst is not None and inst.mask.shape == (5, 1) and inst.area == 5
    for width in ("inf", "nan", 0.5, "x"):
        with pytest.raises(RegionError, match=rf"^image size '?{width}'? x 5 is not a size"):
            result_to_instance(square_on(width, 5))
    monkeypatch.setattr("ovss_label.converters.labelstudio.MAX_REGION_PIXELS", 8 * 8)
    assert result_to_instance(square_on(8, 8)) is not None  # exactly the limit
    message = (
        r"^image size 8 x 9 is over 64 pixels: not decoded "
        r"\(a mask of that size would not fit in memory\)$"
    )
    with pytest.raises(RegionError, match=message):
        result_to_instance(square_on(8, 9))


def test_a_blank_or_empty_label_list_is_no_label() -> None:
    for labels in ([], ["  "], [""]):
        assert region_label({"brushlabels": labels}, "brushlabels") is None
    assert region_label({"brushlabels": [" cat"]}, "brushlabels") == " cat"  # kept as written


def test_scores_are_written_to_6_decimals() -> None:
    for kind in ("brush", "polygon"):
        (item,) = instance_to_results(Instance(SQUARE, "cat", score=0.1234567), kind)
        assert item["score"] == 0.123457


def test_predicted_polygons_keep_within_the_vertex_cap(monkeypatch) -> None:
    ball = Instance(disc(96, 96, 48, 48, 44), "ball")  # 20 vertices at 1 px
    (capped,) = instance_to_results(ball, "polygon", max_vertices=8)
    assert 4 <= len(capped["value"]["points"]) <= 8
    # The default cap is mask_to_polygons' own (README): 1000 vertices per polygon.
    caps: list[int] = []
    trace = labelstudio_module.mask_to_polygons

    def recording(mask, tolerance_px, max_vertices, **options):
        caps.append(max_vertices)
        return trace(mask, tolerance_px, max_vertices, **options)

    monkeypatch.setattr(labelstudio_module, "mask_to_polygons", recording)
    instance_to_results(ball, "polygon")
    assert caps == [1000] == [inspect.signature(trace).parameters["max_vertices"].default]


def test_a_one_pixel_rectangle_is_a_region() -> None:
    value = {"x": 50, "y": 50, "width": 2.5, "height": 5, "rectanglelabels": ["dot"]}  # 1 x 1 px
    inst = result_to_instance(sized("rectanglelabels", value))
    assert inst is not None and inst.area == 1
