"""Label Studio reading guarantees that the converters' mutation run (issue 18) found untested:
which results are one object (``ls_regions``) and what a labeling config tells ``export`` and
``predict`` (``ls_project``).
"""

from __future__ import annotations

import numpy as np
import pytest

from ovss_label.converters import (
    Instance,
    ProjectConfig,
    ResultTargets,
    merge_same_instances,
    polygons_to_mask,
)

H, W = 24, 32


def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def polygon(rid: str | None, *rings: np.ndarray, label: str = "cat", score=None):
    """A polygon result as ``result_to_instance`` reads it: its rings and their pixels."""
    mask = polygons_to_mask(list(rings), H, W)
    return rid, Instance(mask, label, score, polygons=rings, kind="polygon")


def brush(rid: str | None, *boxes: tuple[int, int, int, int], label: str = "cat", score=None):
    """A brush result covering the pixel boxes (x0, y0, x1, y1)."""
    mask = np.zeros((H, W), bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return rid, Instance(mask, label, score)


# ls_regions: one instance per object ---------------------------------------------------------


def test_parts_too_thin_to_cover_a_pixel_centre_merge_by_their_vertices_even_at_the_edges():
    # A brush with a body and a pixel in each far corner; its polygons: the body, and a sliver
    # inside each corner pixel (touching the image's left / right edges) that covers no centre.
    regions = [
        brush("b", (10, 8, 20, 16), (0, 0, 1, 1), (W - 1, H - 1, W, H)),
        polygon("p1", square(10, 8, 20, 16)),
        polygon("p2", np.array([[0.0, 0.1], [0.9, 0.0], [0.2, 0.3]])),
        polygon("p3", np.array([[W, H - 0.1], [W - 0.9, H - 0.2], [W - 0.2, H]])),
    ]
    assert [int(inst.mask.sum()) for _, inst in regions[2:]] == [0, 0]
    merged, folded = merge_same_instances(regions)
    assert ([rid for rid, _ in merged], folded) == (["b"], 3)


def test_a_polygon_reaching_outside_the_image_merges_with_its_brush():
    # Vertices left of and above the image (COCO polygons, hand-made tasks) count from pixel 0.
    for ring in (square(-4, 8, 6, 16), square(2, -5, 12, 3)):
        x0, y0 = (max(int(v), 0) for v in ring.min(axis=0))
        x1, y1 = (int(v) for v in ring.max(axis=0))
        regions = [brush("b", (x0, y0, x1, y1)), polygon("p", ring)]
        merged, folded = merge_same_instances(regions)
        assert ([rid for rid, _ in merged], folded) == (["b"], 1)


def test_a_sliver_inside_a_part_merges_where_its_vertices_are():
    # The same rule away from the corner: the sliver's pixel is (row 20, column 25).
    regions = [
        brush("b", (4, 4, 14, 14), (25, 20, 26, 21)),
        polygon("p1", square(4, 4, 14, 14)),
        polygon("p2", np.array([[25.1, 20.1], [25.9, 20.2], [25.2, 20.3]])),
    ]
    merged, folded = merge_same_instances(regions)
    assert ([rid for rid, _ in merged], folded) == (["b"], 2)


def test_a_small_polygon_inside_a_large_brush_is_another_object() -> None:
    # Fully covered, but the pair overlaps with IoU 25/400: two objects of one label.
    regions = [brush("b", (2, 2, 22, 22)), polygon("p", square(5, 5, 10, 10))]
    merged, folded = merge_same_instances(regions)
    assert ([rid for rid, _ in merged], folded) == (["b", "p"], 0)


def test_half_covered_and_half_overlapping_is_enough_to_merge() -> None:
    # The polygon is twice the brush and holds it: share 0.5 and IoU 0.5, the thresholds.
    regions = [brush("b", (4, 4, 14, 14)), polygon("p", square(4, 4, 14, 24))]
    merged, folded = merge_same_instances(regions)
    assert ([rid for rid, _ in merged], folded) == (["b"], 1)


def test_a_polygon_touching_a_brush_neither_merges_nor_stops_the_brushs_own_polygon() -> None:
    regions = [
        brush("b", (4, 4, 14, 14)),
        polygon("own", square(4, 4, 14, 14)),
        polygon("next door", square(11, 4, 31, 14)),  # 15% of it lies on the brush
    ]
    merged, folded = merge_same_instances(regions)
    assert ([rid for rid, _ in merged], folded) == (["b", "next door"], 1)


def test_results_without_an_id_are_distinct_objects() -> None:
    regions = [brush(None, (2, 2, 8, 8)), brush(None, (20, 2, 26, 8))]
    merged, folded = merge_same_instances(regions)
    assert (len(merged), folded) == (2, 0)


def test_prefer_brush_keeps_the_brush_whatever_the_result_order() -> None:
    # One region id described by a polygon result, then by a brush result.
    regions = [polygon("r1", square(4, 4, 14, 14)), brush("r1", (4, 4, 14, 14))]
    (merged,), folded = merge_same_instances(regions, prefer="brush")
    assert (merged[0], merged[1].kind, folded) == ("r1", "mask", 1)


def test_prefer_polygon_keeps_every_part_as_one_instance() -> None:
    # `predict --format both` of a two-part object: a brush, and one polygon per part.
    first, second = square(2, 2, 8, 8), square(20, 2, 26, 8)
    regions = [
        brush("b", (2, 2, 8, 8), (20, 2, 26, 8), score=0.8),
        polygon("p1", first, score=0.8),
        polygon("p2", second, score=0.8),
    ]
    (merged,), folded = merge_same_instances(regions, prefer="polygon")
    rid, inst = merged
    assert (rid, inst.label, inst.score, inst.kind, folded) == ("p1", "cat", 0.8, "polygon", 2)
    assert inst.polygons is not None and [r.tolist() for r in inst.polygons] == [
        first.tolist(),
        second.tolist(),
    ]
    assert np.array_equal(inst.mask, regions[0][1].mask)


def test_polygons_of_one_region_take_the_first_ones_label_and_score() -> None:
    regions = [
        polygon("r1", square(2, 2, 8, 8), score=0.8),
        polygon("r1", square(20, 2, 26, 8), label="dog", score=0.3),  # a hand-edited task
    ]
    ((rid, inst),), _ = merge_same_instances(regions, prefer="polygon")
    assert (rid, inst.label, inst.score) == ("r1", "cat", 0.8)


def test_a_polygon_covered_equally_by_two_brushes_goes_to_the_first() -> None:
    # Both brushes cover all of the polygon; the tie goes to the first in result order.
    regions = [
        brush("a", (4, 4, 14, 14)),
        brush("b", (4, 4, 16, 16)),
        polygon("p", square(4, 4, 14, 14)),
    ]
    merged, folded = merge_same_instances(regions, prefer="polygon")
    assert ([rid for rid, _ in merged], folded) == (["p", "b"], 1)


@pytest.mark.parametrize("prefer", ["brush", "polygon"])
def test_a_region_of_several_brushes_keeps_its_first_brush(prefer: str) -> None:
    # Brushes are never merged into one another: the first result of the region stays as it is
    # (with prefer="polygon" too, which has no polygon to prefer here).
    regions = [brush("r1", (2, 2, 8, 8), score=0.8), brush("r1", (20, 2, 26, 8), score=0.3)]
    (kept,), folded = merge_same_instances(regions, prefer=prefer)  # type: ignore[arg-type]
    assert kept[0] == "r1" and kept[1] is regions[0][1] and folded == 1


def test_unknown_preference_is_named() -> None:
    with pytest.raises(ValueError, match=r"prefer must be one of \(.*\), got 'rle'"):
        merge_same_instances([], prefer="rle")  # type: ignore[arg-type]


# ls_project: what a labeling config says ----------------------------------------------------


def config(controls: str, image: str = '<Image name="img" value="$image"/>') -> str:
    return f"<View>{image}{controls}</View>"


BRUSH = '<BrushLabels name="mask" toName="img" {}><Label value="cat"/></BrushLabels>'


def test_export_reads_a_config_whose_backend_attributes_are_wrong() -> None:
    # A typo in ovss_method or ovss_min_score must not stop an export: they read as absent.
    xml = config(BRUSH.format('ovss_method="nope" ovss_min_score="2"'))
    with pytest.raises(ValueError, match="ovss_method 'nope'"):
        ProjectConfig.parse(xml, "naclip")
    parsed = ProjectConfig.parse(xml, "naclip", predicting=False)
    assert (parsed.method, parsed.min_score, parsed.targets) == ("naclip", 0.0, None)
    assert parsed.data_key == "image"


def test_the_image_field_is_the_one_the_controls_label() -> None:
    images = '<Image name="thumb" value="$thumb"/><Image name="xray" value="$Xray"/>'
    xml = config(BRUSH.format("").replace('toName="img"', 'toName="xray"'), images)
    parsed = ProjectConfig.parse(xml, "naclip")
    assert parsed.targets is not None
    assert (parsed.data_key, parsed.targets.data_key, parsed.targets.to_name) == (
        "Xray",
        "Xray",
        "xray",
    )


def test_a_polygon_only_config_targets_its_polygon_control() -> None:
    xml = config('<PolygonLabels name="outline" toName="img"><Label value="cat"/></PolygonLabels>')
    targets = ProjectConfig.parse(xml, "naclip").output
    assert (targets.kind, targets.polygon_name, targets.to_name) == ("polygon", "outline", "img")


def test_an_image_given_by_url_in_the_config_names_no_data_field() -> None:
    boxes = '<RectangleLabels name="box" toName="img"><Label value="car"/></RectangleLabels>'
    xml = config(boxes, '<Image name="img" value="https://example.com/a.jpg"/>')
    assert ProjectConfig.parse(xml, "naclip", predicting=False).data_key is None


def test_score_threshold_is_zero_when_absent_and_may_be_zero_or_one() -> None:
    assert ProjectConfig.parse(config(BRUSH.format("")), "naclip").min_score == 0.0
    for value in (0.0, 1.0):
        xml = config(BRUSH.format(f'ovss_min_score="{value:g}"'))
        assert ProjectConfig.parse(xml, "naclip").min_score == value


def test_unknown_result_kind_is_named_with_the_choices() -> None:
    with pytest.raises(
        ValueError, match="unknown result kind 'mask'; use one of brush, polygon, both"
    ):
        ProjectConfig.parse(config(BRUSH.format("")), "naclip", kind="mask")


def test_result_targets_keep_every_polygon_part_unless_given_a_minimum_area() -> None:
    # An interactive click on a polygon-only project asks without a minimum area.
    _, inst = brush(None, (2, 2, 12, 12), (20, 20, 22, 22), score=0.9)  # 100 px and 4 px
    targets = ResultTargets(kind="polygon", polygon_name="outline", to_name="img")
    parts = targets.results([inst])
    assert [(r["type"], r["from_name"], r["to_name"]) for r in parts] == [
        ("polygonlabels", "outline", "img")
    ] * 2
    assert len(targets.results([inst], min_area=0.05)) == 1  # 4 px is 0.5% of the image
