"""COCO writer and reader: segmentation modes, areas and boxes from pycocotools, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import coco_raster, disc, iou
from pycocotools import mask as coco_mask

from ovss_label.converters import (
    CocoError,
    CocoWriter,
    Instance,
    annotation_to_instance,
    read_coco,
    write_json_atomic,
)

H, W = 60, 80
RING = disc(H, W, 40, 30, 20) & ~disc(H, W, 40, 30, 8)
DISC = disc(H, W, 20, 20, 10)


def _decode(annotation: dict) -> np.ndarray:
    seg = annotation["segmentation"]
    if isinstance(seg, list):
        return coco_raster(seg, H, W)
    return coco_mask.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def test_category_ids_follow_vocabulary_order_and_extras_are_appended() -> None:
    writer = CocoWriter(["dog", "cat", "dog"])
    image = writer.add_image("a.jpg", W, H)
    writer.add_instance(image, Instance(DISC, "cat"))
    writer.add_instance(image, Instance(DISC, "zebra"))
    coco = writer.to_dict()
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [
        (1, "dog"),
        (2, "cat"),
        (3, "zebra"),
    ]
    assert [a["category_id"] for a in coco["annotations"]] == [2, 3]
    assert writer.extra_categories == ["zebra"]


def test_auto_mode_uses_rle_for_holes_and_polygons_otherwise() -> None:
    writer = CocoWriter(["a"], segmentation="auto")
    image = writer.add_image("a.jpg", W, H)
    ring = writer.add_instance(image, Instance(RING, "a"))
    plain = writer.add_instance(image, Instance(DISC, "a", score=0.5))
    assert ring is not None and isinstance(ring["segmentation"], dict)
    assert plain is not None and isinstance(plain["segmentation"], list)
    assert iou(_decode(ring), RING) == 1.0 and iou(_decode(plain), DISC) >= 0.98
    assert plain["score"] == 0.5 and plain["iscrowd"] == 0


def test_area_and_bbox_describe_the_written_segmentation() -> None:
    for mode in ("polygon", "rle", "auto"):
        writer = CocoWriter(["a"], segmentation=mode)  # type: ignore[arg-type]
        ann = writer.add_instance(writer.add_image("a.jpg", W, H), Instance(DISC, "a"))
        assert ann is not None
        drawn = _decode(ann)
        assert ann["area"] == int(drawn.sum())
        ys, xs = np.nonzero(drawn)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_polygon_mode_fills_holes_and_counts_them() -> None:
    writer = CocoWriter(["a"], segmentation="polygon")
    ann = writer.add_instance(writer.add_image("a.jpg", W, H), Instance(RING, "a"))
    assert ann is not None and isinstance(ann["segmentation"], list)
    assert writer.holes_filled == 1
    assert _decode(ann)[30, 40]  # the hole is filled


def test_rle_mode_is_exact_and_vector_sources_keep_their_vertices() -> None:
    writer = CocoWriter(["a"], segmentation="rle")
    ann = writer.add_instance(writer.add_image("a.jpg", W, H), Instance(RING, "a"))
    assert ann is not None and iou(_decode(ann), RING) == 1.0
    ring = np.array([[10.5, 10.0], [50.0, 12.25], [30.0, 40.0]])
    auto = CocoWriter(["a"])
    inst = Instance(
        coco_raster([ring.ravel().tolist()], H, W), "a", polygons=(ring,), kind="polygon"
    )
    ann = auto.add_instance(auto.add_image("a.jpg", W, H), inst)
    assert ann is not None and ann["segmentation"] == [ring.ravel().tolist()]


def test_empty_masks_are_not_written() -> None:
    writer = CocoWriter(["a"])
    assert (
        writer.add_instance(writer.add_image("a.jpg", W, H), Instance(np.zeros((H, W)), "a"))
        is None
    )
    assert writer.to_dict()["annotations"] == []
    with pytest.raises(ValueError, match="segmentation"):
        CocoWriter(["a"], segmentation="mask")  # type: ignore[arg-type]


def test_reader_round_trips_the_writer(tmp_path: Path) -> None:
    writer = CocoWriter(["ring", "disc"])
    image = writer.add_image("x/a.jpg", W, H, ls_task_id=5)
    writer.add_instance(image, Instance(RING, "ring"))
    writer.add_instance(image, Instance(DISC, "disc", score=0.25))
    path = tmp_path / "coco.json"
    write_json_atomic(path, writer.to_dict())
    categories, images = read_coco(path)
    assert categories == ["ring", "disc"]
    (img,) = images
    assert (img.file_name, img.width, img.height, img.extra["ls_task_id"]) == ("x/a.jpg", W, H, 5)
    ring, disc_ = img.instances
    assert ring.kind == "mask" and iou(ring.mask, RING) == 1.0
    assert disc_.kind == "polygon" and disc_.score == 0.25 and iou(disc_.mask, DISC) >= 0.98


def test_reader_decodes_uncompressed_rle_and_bare_boxes() -> None:
    fortran = np.asfortranarray(DISC.astype(np.uint8))
    flat = fortran.ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate(([0], flat, [1 - flat[-1]]))))
    counts = np.diff(np.concatenate(([0], changes))).tolist()
    ann = {"id": 1, "segmentation": {"size": [H, W], "counts": counts}, "bbox": [0, 0, 1, 1]}
    inst = annotation_to_instance(ann, H, W, "a")
    assert iou(inst.mask, DISC) == 1.0
    box = annotation_to_instance({"id": 2, "segmentation": [], "bbox": [10, 5, 20, 8]}, H, W, "a")
    assert box.kind == "box" and box.area == 160


def test_reader_errors_name_the_record(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoError, match="not valid JSON"):
        read_coco(bad)
    with pytest.raises(CocoError, match="not a COCO"):
        read_coco({"images": []})
    orphan = {
        "images": [],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 7, "image_id": 3, "category_id": 1}],
    }
    with pytest.raises(CocoError, match="annotation 7"):
        read_coco(orphan)
    rle = {"size": [H + 1, W], "counts": "abc"}
    with pytest.raises(CocoError, match="RLE size"):
        annotation_to_instance({"id": 1, "segmentation": rle}, H, W, "a")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
