"""LabelMe, YOLO and COCO-import guarantees that the converters' mutation run (issue 18) found
untested: file layouts, option plumbing, report counts, clipping, and reader error messages.

Each test states a format guarantee; the images are small synthetic masks, written through the
same writer objects ``ovss-label export`` uses (``TaskImage`` in, files out).
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import disc
from PIL import Image

from ovss_label.converters import (
    CocoImage,
    ExportReport,
    Instance,
    LabelmeWriter,
    Skipped,
    TaskImage,
    YoloWriter,
    coco_to_tasks,
    polygons_to_mask,
    rectangle_corners,
)
from ovss_label.converters.instance import mask_has_holes, min_area_pixels
from ovss_label.converters.labelme import instance_shapes
from ovss_label.converters.yolo import yolo_lines

H, W = 24, 32
HOLED = np.zeros((H, W), bool)
HOLED[4:16, 4:16] = True
HOLED[8:12, 8:12] = False  # a 4x4 hole: filling it changes the mask by 16/128 px
HOLED_2 = np.roll(HOLED, 14, axis=1)  # a second object with a hole
BAR = np.zeros((H, W), bool)
BAR[18:22, 2:30] = True
TRIANGLE = np.array([[1.25, 1.5], [20.75, 2.0], [6.0, 18.5]])  # a Label Studio polygon
SHAPE_KEYS = ["label", "points", "group_id", "description", "shape_type", "flags", "mask"]
BIG = disc(96, 96, 48, 48, 44)  # traced outlines of this disc depend on the tolerance


def vector(ring: np.ndarray, label: str, h: int = H, w: int = W, kind: Any = "polygon"):
    """An instance from vector data (a Label Studio polygon or rectangle): its own vertices."""
    return Instance(polygons_to_mask([ring], h, w), label, polygons=(ring,), kind=kind)


def image(*instances: Instance, task_id: int = 1, name: str = "photos/a.png") -> TaskImage:
    h, w = instances[0].mask.shape if instances else (H, W)
    regions = [(f"r{i}", inst) for i, inst in enumerate(instances)]
    return TaskImage(f"task {task_id}", task_id, f"/data/{name}", name, w, h, regions)


def labelme_shapes(out: Path, *instances: Instance, **options) -> tuple[LabelmeWriter, list]:
    writer = LabelmeWriter(out, **options)
    writer.add(image(*instances), ExportReport())
    writer.close()
    return writer, json.loads((out / "photos" / "a.json").read_text())["shapes"]


def yolo_text(out: Path, *instances: Instance, **options) -> tuple[YoloWriter, str]:
    writer = YoloWriter(out, options.pop("categories", ["cat", "dog"]), **options)
    writer.add(image(*instances), ExportReport())
    writer.close()
    return writer, (out / "labels" / "photos" / "a.txt").read_text()


# LabelMe ------------------------------------------------------------------------------------


def test_labelme_file_is_laid_out_as_labelme_saves_it(tmp_path: Path) -> None:
    sign, cat = vector(TRIANGLE, "sign"), Instance(HOLED, "cat", score=0.9)
    _, shapes = labelme_shapes(tmp_path, sign, cat, segmentation="auto")
    text = (tmp_path / "photos" / "a.json").read_text()
    assert text.startswith('{\n  "version": "5.5.0",\n  "flags": {},\n  "shapes": [\n    {')
    doc = json.loads(text)
    assert list(doc) == [
        "version",
        "flags",
        "shapes",
        "imagePath",
        "imageData",
        "imageHeight",
        "imageWidth",
    ]
    assert (doc["imagePath"], doc["imageData"], doc["imageHeight"], doc["imageWidth"]) == (
        "a.png",
        None,
        H,
        W,
    )
    polygon, mask = shapes
    assert all(list(shape) == SHAPE_KEYS for shape in shapes)
    # A human polygon (3 vertices, the minimum) keeps its sub-pixel vertices; no score, no text.
    assert polygon == {
        "label": "sign",
        "points": TRIANGLE.tolist(),
        "group_id": None,
        "description": "",
        "shape_type": "polygon",
        "flags": {},
        "mask": None,
    }
    assert (mask["shape_type"], mask["description"]) == ("mask", "score 0.9000")
    assert mask["points"] == [[4.0, 4.0], [15.0, 15.0]]
    crop = np.array(Image.open(io.BytesIO(base64.b64decode(mask["mask"]))))
    assert crop.dtype == np.uint8 and np.array_equal(crop, HOLED[4:16, 4:16])


@pytest.mark.parametrize(
    ("mode", "types", "filled"),
    [
        ("polygon", ["polygon", "polygon", "polygon"], 2),  # holes filled, and counted
        ("auto", ["mask", "mask", "polygon"], 0),  # masks with holes stay exact
        ("rle", ["mask", "mask", "mask"], 0),
    ],
)
def test_labelme_segmentation_mode_picks_the_shapes_and_counts_filled_holes(
    tmp_path: Path, mode: str, types: list[str], filled: int
) -> None:
    masks = Instance(HOLED, "cat"), Instance(HOLED_2, "cat"), Instance(BAR, "dog")
    writer, shapes = labelme_shapes(tmp_path, *masks, segmentation=mode)
    assert [s["shape_type"] for s in shapes] == types
    assert writer.holes_filled == filled
    # The public per-instance function follows the same modes.
    assert [s["shape_type"] for s in instance_shapes(masks[0], 1, mode)] == types[:1]


# YOLO ---------------------------------------------------------------------------------------


def test_yolo_classes_follow_the_categories_and_new_labels_are_appended(tmp_path: Path) -> None:
    labels = ["dog", "café", "cat"]
    instances = [Instance(m, label) for m, label in zip((HOLED, BAR, HOLED_2), labels, strict=True)]
    writer, text = yolo_text(tmp_path, *instances, categories=["cat", "dog"])
    assert [line.split()[0] for line in text.splitlines()] == ["1", "2", "0"]
    data_yaml = (tmp_path / "data.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(data_yaml) == {
        "train": "images",
        "val": "images",
        "nc": 3,
        "names": {0: "cat", 1: "dog", 2: "café"},
    }
    assert "2: café" in data_yaml  # names are readable as written, not escaped
    assert writer.names == ["cat", "dog", "café"]


def test_yolo_export_without_any_image_still_writes_data_yaml(tmp_path: Path) -> None:
    out = tmp_path / "exports" / "run 1" / "yolo"  # none of it exists yet
    writer = YoloWriter(out, ["cat"])
    writer.close()
    assert yaml.safe_load((out / "data.yaml").read_text()) == {
        "train": "images",
        "val": "images",
        "nc": 1,
        "names": {0: "cat"},
    }
    assert writer.holes_filled == 0


def test_yolo_fills_holes_of_traced_masks_only_and_counts_them(tmp_path: Path) -> None:
    instances = (
        Instance(HOLED, "cat"),
        Instance(HOLED_2, "cat"),
        Instance(BAR, "dog"),
        vector(TRIANGLE, "dog"),
    )
    writer, text = yolo_text(tmp_path, *instances)
    assert len(text.splitlines()) == 4  # one outer ring each
    assert writer.holes_filled == 2


def test_yolo_lines_keep_triangles_and_clip_vertices_outside_the_image() -> None:
    # A Label Studio rectangle rotated 45 degrees about (5, 0): three corners leave the image.
    side = 60 * math.sqrt(2)  # percent of 10 px: a 6 x 6 px diagonal
    value = {"x": 50, "y": 0, "width": side, "height": side, "rotation": 45}
    corners = rectangle_corners(value, 10, 10)
    assert corners.round(6).tolist() == [[5, 0], [11, 6], [5, 12], [-1, 6]]
    box = vector(corners, "sign", 10, 10, kind="box")
    # Ultralytics drops a label file with coordinates outside [0, 1]: they are clipped.
    line = "0 0.500000 0.000000 1.000000 0.600000 0.500000 1.000000 0.000000 0.600000"
    assert yolo_lines(box, 0) == [line]
    triangle = vector(np.array([[1.0, 1.0], [9.0, 1.0], [5.0, 9.0]]), "sign", 10, 10)
    assert yolo_lines(triangle, 3) == ["3 0.100000 0.100000 0.900000 0.100000 0.500000 0.900000"]


# Both one-file-per-image formats ------------------------------------------------------------


def test_a_second_task_of_the_same_image_is_reported_and_not_written(tmp_path: Path) -> None:
    first = image(Instance(BAR, "dog"), task_id=1)
    second = image(Instance(HOLED, "cat"), task_id=2)  # same file_name, another task
    labelme, yolo = LabelmeWriter(tmp_path / "lm"), YoloWriter(tmp_path / "yolo", ["cat", "dog"])
    for writer, path in (
        (labelme, tmp_path / "lm" / "photos" / "a.json"),
        (yolo, tmp_path / "yolo" / "labels" / "photos" / "a.txt"),
    ):
        report = ExportReport()
        writer.add(first, report)
        writer.add(second, report)
        reason = f"{path} already written from another task of the same image"
        assert report.skipped == [Skipped(2, None, reason, "task 2")]
    shapes = json.loads((tmp_path / "lm" / "photos" / "a.json").read_text())["shapes"]
    assert [s["label"] for s in shapes] == ["dog"]  # the first task's file is kept
    assert (tmp_path / "yolo/labels/photos/a.txt").read_text().startswith("1 ")


def test_two_images_with_one_name_stem_are_reported_with_the_fix(tmp_path: Path) -> None:
    jpg = image(Instance(BAR, "dog"), task_id=1, name="photos/a.jpg")
    png = image(Instance(BAR, "dog"), task_id=2, name="photos/a.png")
    report = ExportReport()
    writer = LabelmeWriter(tmp_path)
    writer.add(jpg, report)
    writer.add(png, report)
    path = tmp_path / "photos" / "a.json"
    reason = (
        f"{path} already written for photos/a.jpg: both images give one output file "
        "(same name stem); rename one of them"
    )
    assert report.skipped == [Skipped(2, None, reason, "task 2")]


def test_tolerance_option_simplifies_traced_outlines_in_every_format(tmp_path: Path) -> None:
    ball = Instance(BIG, "ball")

    def vertices(tolerance: float) -> dict[str, int]:
        out = tmp_path / str(tolerance)
        _, shapes = labelme_shapes(out / "lm", ball, segmentation="polygon", tolerance_px=tolerance)
        _, text = yolo_text(out / "yolo", ball, tolerance_px=tolerance)
        images = [CocoImage(1, "a.png", 96, 96, [ball])]
        tasks, _ = coco_to_tasks(images, fmt="polygon", tolerance_px=tolerance)
        return {
            "labelme": len(shapes[0]["points"]),
            "yolo": len(text.split()[1:]) // 2,
            "import": len(tasks[0]["predictions"][0]["result"][0]["value"]["points"]),
        }

    fine, coarse = vertices(0.25), vertices(3.0)
    assert all(fine[k] > coarse[k] for k in fine), (fine, coarse)


def test_min_area_may_be_the_whole_image() -> None:
    assert min_area_pixels(1.0, 10, 20) == 200  # --min-area 1: only a mask covering everything
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        min_area_pixels(1.5, 10, 20)


# ---- instance.py: the mask contract and its errors ---------------------------------------------
def test_an_instance_refuses_what_is_not_a_mask_and_says_why() -> None:
    with pytest.raises(ValueError, match=r"must be 2-D \(H, W\), got shape \(2, 3, 4\)"):
        Instance(np.ones((2, 3, 4), bool), "cat")
    with pytest.raises(ValueError, match="of kind 'polygon' needs its source polygons"):
        Instance(np.ones((2, 3), bool), "cat", kind="polygon")


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_holes_are_found_in_any_mask_where_non_zero_means_inside(dtype: Any) -> None:
    """A 0/1 mask of another dtype is the same mask (``~`` of a uint8 1 is 254, not False)."""
    ring = np.zeros((9, 9), dtype)
    ring[2:7, 2:7] = 1
    assert not mask_has_holes(ring)
    ring[4, 4] = 0
    assert mask_has_holes(ring)
    assert mask_has_holes(ring.astype(bool))
