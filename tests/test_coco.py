"""COCO writer and reader: segmentation modes, areas and boxes from pycocotools, errors; and
the COCO export of tasks that draw one object twice (a brush and polygons)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import coco_raster, disc, fill_holes, iou, source_mask
from label_studio_sdk.converter.brush import mask2rle
from pycocotools import mask as coco_mask

from ovss_label.cli import cli
from ovss_label.converters import (
    CocoError,
    CocoWriter,
    Instance,
    annotation_to_instance,
    instances_to_results,
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


# One object drawn twice (issue 11): `predict --format both` writes every instance as a brush
# and one polygon per part; results sharing a region id are one region.
H2, W2 = 120, 160
SPECKS = np.zeros((H2, W2), bool)
SPECKS[95:118:3, 100:157:3] = True  # 8 x 19 isolated pixels: one polygon each
OBJECTS = [
    Instance(disc(H2, W2, 30, 30, 20), "cat", 0.9),
    Instance(disc(H2, W2, 80, 40, 25) & ~disc(H2, W2, 80, 40, 10), "dog", 0.8),  # a hole
    Instance(disc(H2, W2, 20, 95, 10) | disc(H2, W2, 55, 95, 12), "cat", 0.7),  # two parts
    Instance(SPECKS | disc(H2, W2, 130, 60, 12), "cat", 0.6),  # 153 parts
]


def export_tasks(tmp_path: Path, tasks: list[dict], *options: str) -> dict:
    source, out = tmp_path / "tasks.json", tmp_path / "coco.json"
    source.write_text(json.dumps(tasks))
    args = ["export", "--coco", str(source), "-o", str(out), "--include-predictions", *options]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def predict_both_task() -> dict:
    """A task as `ovss-label predict --format both` writes it (no id; size in meta)."""
    results = instances_to_results(OBJECTS, "both")
    return {
        "data": {"image": "/data/local-files/?d=photos/a.png"},
        "meta": {"original_width": W2, "original_height": H2},
        "predictions": [{"model_version": "m", "score": 0.75, "result": results}],
    }


def decode_ann(ann: dict, h: int = H2, w: int = W2) -> np.ndarray:
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return coco_raster(seg, h, w)
    return coco_mask.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def of_type(task: dict, kind: str) -> list[dict]:
    return [r for r in task["predictions"][0]["result"] if r["type"] == kind]


def test_predict_both_output_gives_each_instance_once_as_its_brush(tmp_path: Path) -> None:
    task = predict_both_task()
    brushes, polygons = of_type(task, "brushlabels"), of_type(task, "polygonlabels")
    assert len(brushes) == 4 and len(polygons) > 150  # one per part: 1 + 1 + 2 + 153
    coco = export_tasks(tmp_path, [task], "--segmentation", "rle")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert len(coco["annotations"]) == len(brushes)
    for ann, brush in zip(coco["annotations"], brushes, strict=True):
        assert names[ann["category_id"]] == brush["value"]["brushlabels"][0]
        assert iou(decode_ann(ann), source_mask(brush)) == 1.0  # the exact brush, holes kept


def test_prefer_polygon_exports_each_instance_once_as_its_polygons(tmp_path: Path) -> None:
    task = predict_both_task()
    coco = export_tasks(tmp_path, [task], "--prefer", "polygon")
    annotations = coco["annotations"]
    assert len(annotations) == 4
    assert all(isinstance(a["segmentation"], list) for a in annotations)
    # Every polygon result is in exactly one annotation, with its own vertices.
    written = sorted(tuple(np.round(ring, 2)) for a in annotations for ring in a["segmentation"])
    source = [
        [c * size / 100 for x, y in r["value"]["points"] for c, size in ((x, W2), (y, H2))]
        for r in of_type(task, "polygonlabels")
    ]
    assert written == sorted(tuple(np.round(ring, 2)) for ring in source)
    for ann, brush in zip(annotations, of_type(task, "brushlabels"), strict=True):
        assert iou(decode_ann(ann), fill_holes(source_mask(brush))) >= 0.9


SIZE = {"original_width": W2, "original_height": H2}


def brush(mask: np.ndarray, label: str, rid: str) -> dict:
    rle = mask2rle(mask.astype(np.uint8) * 255)  # the SDK's encoder, as Label Studio's
    value = {"format": "rle", "rle": rle, "brushlabels": [label]}
    return {"id": rid, "type": "brushlabels", "value": value} | SIZE


def polygon(xy: list[tuple[float, float]], label: str, rid: str) -> dict:
    points = [[100 * x / W2, 100 * y / H2] for x, y in xy]
    return {
        "id": rid,
        "type": "polygonlabels",
        "value": {"points": points, "polygonlabels": [label]},
    } | SIZE


def square(x: float, y: float, side: float) -> list[tuple[float, float]]:
    return [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]


def test_one_region_id_is_one_object_and_distinct_objects_stay(tmp_path: Path) -> None:
    left = disc(H2, W2, 30, 30, 15)
    results = [
        brush(left, "cat", "r1"),
        polygon(square(30, 10, 40), "cat", "r1"),  # same id, mostly elsewhere: still one region
        brush(disc(H2, W2, 120, 30, 15), "cat", "r2"),
        polygon(square(105, 70, 30), "cat", "r3"),  # another cat, drawn with the other tool
        polygon(square(105, 15, 30), "dog", "r4"),  # over the r2 cat, but another label
    ]
    task = {
        "id": 1,
        "data": {"image": "/data/upload/1/a.png"},
        "annotations": [{"result": results}],
    }
    coco = export_tasks(tmp_path, [task], "--segmentation", "rle")
    annotations = coco["annotations"]
    assert len(annotations) == 4
    assert iou(decode_ann(annotations[0]), left) == 1.0  # r1 kept as its brush
    polygons = export_tasks(tmp_path, [task], "--prefer", "polygon")["annotations"]
    assert polygons[0]["segmentation"] == [[30.0, 10.0, 70.0, 10.0, 70.0, 50.0, 30.0, 50.0]]
