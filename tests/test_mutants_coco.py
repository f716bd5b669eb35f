"""COCO guarantees that the converters' mutation run (issue 18) found untested: the reader's
records and error messages, ``import --coco``'s report and URLs, and the library entry point
``export_tasks_to_coco`` (which no other test calls; the CLI uses ``CocoTaskWriter``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import disc

from ovss_label.converters import (
    CocoError,
    CocoImage,
    CocoTaskWriter,
    CocoWriter,
    ExportReport,
    Instance,
    Skipped,
    TaskImage,
    annotation_to_instance,
    coco_to_tasks,
    export_tasks_to_coco,
    instances_to_results,
    polygon_rings,
    polygons_to_mask,
    read_coco,
    write_bytes_atomic,
    write_json_atomic,
)

# Reader -------------------------------------------------------------------------------------


def coco(*annotations: dict, **image_fields) -> dict:
    """A COCO dict with one 6x4 image (id 1) and one category (id 1, "cat")."""
    image = {"id": 1, "file_name": "a.jpg", "width": 6, "height": 4} | image_fields
    return {
        "images": [image],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": list(annotations),
    }


def test_reader_keeps_image_ids_and_their_other_fields() -> None:
    data = coco(id=42, license=3, ls_image_url="s3://bucket/a.jpg")
    data["annotations"] = [{"id": 1, "image_id": 42, "category_id": 1, "bbox": [0, 0, 2, 2]}]
    _, (image,) = read_coco(data)
    assert (image.id, image.file_name, image.width, image.height) == (42, "a.jpg", 6, 4)
    assert image.extra == {"license": 3, "ls_image_url": "s3://bucket/a.jpg"}
    assert [inst.area for inst in image.instances] == [4]


def test_reader_reads_image_info_files_without_annotations(tmp_path: Path) -> None:
    # COCO's image_info_*.json (test splits) have images and categories, no "annotations".
    data = coco()
    del data["annotations"]
    path = tmp_path / "image_info.json"
    path.write_text(json.dumps(data))
    categories, (image,) = read_coco(path)
    assert categories == ["cat"] and image.instances == []


@pytest.mark.parametrize("missing", ["image_id", "category_id"])
def test_annotation_without_its_image_or_category_is_an_error(missing: str) -> None:
    annotation = {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}
    del annotation[missing]  # image 1 and category 1 exist: nothing may be guessed
    with pytest.raises(CocoError, match="annotation 5 references a missing image or category"):
        read_coco(coco(annotation))


def test_reader_errors_say_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(CocoError, match="a COCO file is a JSON object, got list"):
        read_coco(path)
    no_size = {"id": 6, "image_id": 1, "category_id": 1, "segmentation": {"counts": "abc"}}
    with pytest.raises(CocoError, match=r"RLE size None != image \[4, 6\]"):
        read_coco(coco(no_size))
    other_size = no_size | {"segmentation": {"size": [3, 3], "counts": "abc"}}
    with pytest.raises(CocoError, match=r"RLE size \[3, 3\] != image \[4, 6\]"):
        read_coco(coco(other_size))
    nothing = {"id": 7, "image_id": 1, "category_id": 1}  # neither segmentation nor bbox
    with pytest.raises(CocoError, match="annotation 7: 'bbox'"):
        read_coco(coco(nothing))


def test_a_boolean_id_matches_no_record() -> None:
    # True == 1 in Python: read as an id it would attach the annotation to image 1.
    annotation = {"id": 5, "image_id": True, "category_id": 1, "bbox": [0, 0, 2, 2]}
    with pytest.raises(CocoError, match="annotation 5 references a missing image or category"):
        read_coco(coco(annotation))


def test_annotations_that_are_not_a_list_are_named() -> None:
    data = coco() | {"annotations": {"id": 1}}
    with pytest.raises(CocoError, match=r"^not a COCO instances file: annotations is not a list$"):
        read_coco(data)


def test_detection_boxes_keep_their_score_into_label_studio() -> None:
    # COCO detection results: a bbox and a score, no segmentation.
    box = annotation_to_instance({"id": 1, "bbox": [1, 1, 3, 2], "score": 0.7}, 4, 6, "cat")
    assert (box.kind, box.area, box.score) == ("box", 6, 0.7)
    tasks, _ = coco_to_tasks([CocoImage(1, "a.jpg", 6, 4, [box])])
    (result,) = tasks[0]["predictions"][0]["result"]
    assert (result["type"], result["score"]) == ("rectanglelabels", 0.7)


# import --coco ------------------------------------------------------------------------------

H, W = 24, 32
HOLED = np.zeros((H, W), bool)
HOLED[4:16, 4:16] = True
HOLED[8:12, 8:12] = False
BAR = np.zeros((H, W), bool)
BAR[18:22, 2:30] = True


@pytest.mark.parametrize(("fmt", "dropped"), [("polygon", 2), ("auto", 0), ("brush", 0)])
def test_import_report_counts_images_regions_and_dropped_holes(fmt: str, dropped: int) -> None:
    images = [
        CocoImage(1, "a.jpg", W, H, [Instance(HOLED, "cat"), Instance(np.roll(HOLED, 14), "cat")]),
        CocoImage(2, "b.jpg", W, H, [Instance(BAR, "dog")]),
    ]
    tasks, report = coco_to_tasks(images, fmt=fmt)  # type: ignore[arg-type]
    assert len(tasks) == report.images == 2
    assert report.per_category == {"cat": 2, "dog": 1}
    assert report.holes_dropped == dropped  # Label Studio polygons cannot hold the holes


def test_image_root_is_joined_with_exactly_one_separator() -> None:
    images = [CocoImage(1, "x/a.jpg", W, H, [])]
    for root, url in (
        ("https://bucket/images/", "https://bucket/images/x/a.jpg"),
        ("https://bucket/images", "https://bucket/images/x/a.jpg"),
        ("/data/local-files/?d=", "/data/local-files/?d=x/a.jpg"),
    ):
        tasks, _ = coco_to_tasks(images, image_root=root)
        assert tasks[0]["data"]["image"] == url


def test_import_defaults_and_the_task_score() -> None:
    ball = Instance(disc(H, W, 16, 12, 10), "ball", score=0.1234567)
    other = Instance(BAR, "bar", score=0.5)
    images = [CocoImage(1, "a.jpg", W, H, [ball, other])]
    (task,), _ = coco_to_tasks(images, fmt="polygon")
    (explicit,), _ = coco_to_tasks(
        images, fmt="polygon", model_version="coco-import", tolerance_px=1.0
    )
    assert task == explicit
    (coarse,), _ = coco_to_tasks(images, fmt="polygon", tolerance_px=2.0)
    assert coarse != task  # the tolerance default is 1 px, not just any value
    prediction = task["predictions"][0]
    assert prediction["model_version"] == "coco-import"  # how Label Studio lists them
    assert prediction["score"] == 0.311728  # the mean of the scores, to 6 decimals


def test_unknown_import_format_is_named() -> None:
    with pytest.raises(ValueError, match="fmt must be auto, brush or polygon, got 'mask'"):
        coco_to_tasks([], fmt="mask")  # type: ignore[arg-type]


# export_tasks_to_coco -----------------------------------------------------------------------

N = 96
DOG = disc(N, N, 48, 48, 44)  # traced outline depends on the tolerance (20 vertices at 1 px)
CAT = np.zeros((N, N), bool)
CAT[10:40, 10:40] = True
CAT[20:30, 20:30] = False  # a hole: auto mode writes it as RLE


def ls_task(task_id: int, *instances: Instance, kind: Any = "brush", where: str = "annotations"):
    """A task whose annotation (or prediction) has the instances' results, as LS exports it."""
    record = {"id": 10 * task_id, "result": instances_to_results(instances, kind)}
    return {"id": task_id, "data": {"image": f"/data/upload/1/{task_id}.png"}, where: [record]}


TASKS = [
    ls_task(1, Instance(CAT, "cat"), Instance(DOG, "dog")),
    ls_task(2, Instance(DOG, "dog"), where="predictions"),  # unlabelled: a prediction only
]


def test_export_tasks_to_coco_defaults_are_the_export_commands() -> None:
    data, report = export_tasks_to_coco(TASKS)
    explicit, _ = export_tasks_to_coco(
        TASKS,
        categories=None,
        segmentation="auto",
        include_predictions=False,
        tolerance_px=1.0,
        prefer="brush",
    )
    assert data == explicit
    assert [im["file_name"] for im in data["images"]] == ["upload/1/1.png"]
    assert (report.images, report.unlabelled) == (1, 1)
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "cat"), (2, "dog")]
    cat, dog = data["annotations"]
    assert isinstance(cat["segmentation"], dict)  # holes kept
    assert isinstance(dog["segmentation"], list) and len(dog["segmentation"][0]) == 2 * 20


def test_export_tasks_to_coco_category_order_and_extra_labels() -> None:
    data, report = export_tasks_to_coco(TASKS, categories=["dog", "cat"])
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "dog"), (2, "cat")]
    assert [a["category_id"] for a in data["annotations"]] == [2, 1]
    assert report.extra_categories == []
    data, report = export_tasks_to_coco(TASKS, categories=["dog"])
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "dog"), (2, "cat")]
    assert report.extra_categories == ["cat"]


def test_export_tasks_to_coco_segmentation_and_tolerance() -> None:
    rle, _ = export_tasks_to_coco(TASKS, segmentation="rle")
    assert all(isinstance(a["segmentation"], dict) for a in rle["annotations"])
    polygon, report = export_tasks_to_coco(TASKS, segmentation="polygon")
    assert all(isinstance(a["segmentation"], list) for a in polygon["annotations"])
    assert report.holes_filled["COCO"] == 1

    def dog_vertices(tolerance: float) -> int:
        data, _ = export_tasks_to_coco(TASKS, segmentation="polygon", tolerance_px=tolerance)
        return len(data["annotations"][1]["segmentation"][0]) // 2

    assert dog_vertices(0.25) > dog_vertices(3.0)


def test_export_tasks_to_coco_passes_the_reader_options() -> None:
    data, report = export_tasks_to_coco(TASKS, include_predictions=True)
    assert len(data["images"]) == 2 and report.from_predictions == 1

    two_fields = ls_task(3, Instance(DOG, "dog"))
    two_fields["data"] = {"photo": "/data/upload/1/3.png", "thumb": "/data/upload/1/3-small.png"}
    data, report = export_tasks_to_coco([two_fields])
    assert data["images"] == [] and "cannot tell which data field" in report.skipped[0].reason
    data, _ = export_tasks_to_coco([two_fields], data_key="photo")
    assert [im["file_name"] for im in data["images"]] == ["upload/1/3.png"]

    empty = {"id": 4, "data": {"image": "/data/upload/1/4.png"}, "annotations": [{"result": []}]}
    data, report = export_tasks_to_coco([empty])  # "nothing here", but of unknown size
    assert data["images"] == [] and "image size unknown" in report.skipped[0].reason
    data, _ = export_tasks_to_coco([empty], image_size=lambda task, url: (64, 48))
    assert [(im["width"], im["height"]) for im in data["images"]] == [(64, 48)]

    both = [ls_task(5, Instance(CAT, "cat"), kind="both")]  # predict --format both
    brush, _ = export_tasks_to_coco(both)
    polygons, _ = export_tasks_to_coco(both, prefer="polygon")
    assert isinstance(brush["annotations"][0]["segmentation"], dict)  # the brush, holes kept
    assert isinstance(polygons["annotations"][0]["segmentation"], list)  # its polygon
    assert len(brush["annotations"]) == len(polygons["annotations"]) == 1


# CocoWriter (`predict --coco` uses its defaults) ----------------------------------------------


def test_coco_file_has_the_standard_records_and_ids_from_one() -> None:
    writer = CocoWriter(["cat"])
    first, second = writer.add_image("a.jpg", W, H), writer.add_image("b.jpg", W, H)
    writer.add_instance(first, Instance(BAR, "cat"))
    writer.add_instance(second, Instance(BAR, "cat"))
    data = writer.to_dict()
    assert list(data) == ["info", "licenses", "images", "categories", "annotations"]
    assert (data["info"], data["licenses"]) == ({"description": "exported by ovss-label"}, [])
    assert data["categories"] == [{"id": 1, "name": "cat", "supercategory": ""}]
    assert [im["id"] for im in data["images"]] == [first, second] == [1, 2]
    assert [(a["id"], a["image_id"]) for a in data["annotations"]] == [(1, 1), (2, 2)]


def test_coco_writer_defaults_are_the_export_commands() -> None:
    ball = Instance(DOG, "ball")
    written = []
    for writer in (
        CocoWriter(["ball"]),
        CocoWriter(["ball"], segmentation="auto", tolerance_px=1.0, min_polygon_iou=0.98),
    ):
        writer.add_instance(writer.add_image("a.jpg", N, N), ball)
        written.append(writer.to_dict()["annotations"])
    assert written[0] == written[1]
    assert len(written[0][0]["segmentation"][0]) == 2 * 20  # traced at 1 px


def test_coco_task_writer_defaults_and_regions_that_draw_no_pixel() -> None:
    holed = np.zeros((N, N), bool)
    holed[10:40, 10:40] = True
    holed[20:22, 20:22] = False  # a small hole: "auto" keeps it as RLE
    sliver = np.array([[50.1, 50.1], [50.9, 50.2], [50.2, 50.3]])  # covers no pixel centre
    empty = Instance(np.zeros((N, N), bool), "ball", polygons=(sliver,), kind="polygon")
    regions = [("a", Instance(DOG, "ball")), ("b", Instance(holed, "ball")), ("c", empty)]
    image = TaskImage("task 3", 3, "/data/a.jpg", "a.jpg", N, N, regions)
    written, reports = [], []
    for writer in (
        CocoTaskWriter(["ball"]),
        CocoTaskWriter(["ball"], segmentation="auto", tolerance_px=1.0),
    ):
        reports.append(ExportReport())
        writer.add(image, reports[-1])
        written.append(writer.coco.to_dict()["annotations"])
    assert written[0] == written[1]
    assert [type(a["segmentation"]).__name__ for a in written[0]] == ["list", "dict"]
    assert len(written[0][0]["segmentation"][0]) == 2 * 20  # traced at 1 px
    reason = "empty region (no pixels)"
    assert reports[0].skipped == [Skipped(3, "c", reason, "task 3")]


def test_only_traced_masks_count_as_holes_filled() -> None:
    # A Label Studio polygon whose ring folds back around a hole is written with its own
    # vertices: the hole survives rasterisation, nothing was filled.
    ring = [[2, 2], [20, 2], [20, 20], [2, 20], [2, 11], [11, 11], [11, 8], [8, 8], [8, 14]]
    ring += [[14, 14], [14, 11], [11, 11], [2, 11]]
    keyhole = np.array(ring, dtype=np.float64)
    mask = polygons_to_mask([keyhole], N, N)
    vector = Instance(mask, "ball", polygons=(keyhole,), kind="polygon")
    assert vector.has_holes()
    writer = CocoWriter(["ball"], segmentation="polygon")
    writer.add_instance(writer.add_image("a.jpg", N, N), vector)
    assert writer.holes_filled == 0
    writer.add_instance(1, Instance(mask, "ball"))  # the same pixels as a mask: traced, filled
    assert writer.holes_filled == 1


def test_polygon_rings_defaults_are_the_export_commands() -> None:
    holed = np.zeros((N, N), bool)
    holed[10:40, 10:40] = True
    holed[20:22, 20:22] = False
    assert polygon_rings(Instance(holed, "ball")) is None  # auto: a hole stays exact (RLE)
    ball = Instance(DOG, "ball")
    (ring,) = polygon_rings(ball)
    (same,) = polygon_rings(ball, "auto", 1.0)
    assert np.array_equal(ring, same) and len(ring) == 20  # traced at 1 px


def test_min_polygon_iou_decides_between_polygons_and_rle() -> None:
    square = np.zeros((N, N), bool)
    square[10:40, 20:50] = True
    exact = CocoWriter(["x"], min_polygon_iou=1.0)
    image = exact.add_image("a.jpg", N, N)
    kinds = [
        type(exact.add_instance(image, Instance(m, "x"))["segmentation"])  # type: ignore[index]
        for m in (square, DOG)
    ]
    assert kinds == [list, dict]  # the square's outline is exact (IoU 1.0); the disc's is not


def test_auto_keeps_any_hole_and_polygon_mode_counts_each_filled_one() -> None:
    pinhole = np.zeros((H, W), bool)
    pinhole[2:22, 2:22] = True
    pinhole[10, 10] = False  # 1 pixel of 400: its polygon would still overlap it by 99.7%
    auto = CocoWriter(["x"])
    annotation = auto.add_instance(auto.add_image("a.jpg", W, H), Instance(pinhole, "x"))
    assert annotation is not None and isinstance(annotation["segmentation"], dict)
    polygon = CocoWriter(["x"], segmentation="polygon")
    image = polygon.add_image("a.jpg", W, H)
    for mask in (pinhole, HOLED, BAR):
        polygon.add_instance(image, Instance(mask, "x"))
    assert polygon.holes_filled == 2


def test_an_rle_whose_counts_are_neither_text_nor_runs_is_named() -> None:
    annotation = {"id": 3, "image_id": 1, "category_id": 1}
    annotation["segmentation"] = {"size": [4, 6], "counts": 17}
    with pytest.raises(CocoError, match="unsupported segmentation of type dict"):
        read_coco(coco(annotation))


def test_json_is_written_to_a_hidden_temp_file_beside_the_target(tmp_path, monkeypatch) -> None:
    # A rename within one folder is atomic; a half-written file is never the target.
    renames: list[tuple[str, str]] = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), replace(a, b)))
    target = tmp_path / "out" / "coco.json"
    write_json_atomic(target, {"ok": 1})
    ((temp, final),) = renames
    assert Path(final) == target and Path(temp).parent == target.parent
    assert Path(temp).name.startswith(".coco.json.")
    assert json.loads(target.read_text()) == {"ok": 1}


def test_the_temp_file_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(a), replace(a, b)))
    write_bytes_atomic(tmp_path / "a.bin", b"data")
    assert events[0] == "fsync" and events[1].endswith(".tmp")  # leftovers are recognisable
    events.clear()
    write_bytes_atomic(tmp_path / "a.bin", b"data", fsync=False)  # caches may skip the flush
    assert len(events) == 1 and events[0] != "fsync"


def test_a_failed_write_removes_its_temp_file_and_keeps_the_target(tmp_path, monkeypatch) -> None:
    target = tmp_path / "coco.json"
    target.write_text("old")

    def broken(a: str, b: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match=r"^disk full$"):
        write_json_atomic(target, {"new": 1})
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
