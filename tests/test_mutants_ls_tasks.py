"""Reading a Label Studio export (``ls_tasks``): guarantees that the converters' mutation run
(issue 18) found untested. The export summary's counts and every skip's task, region and
reason; where sizes, names and the image field come from; which record is a task's labels.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ovss_label.converters import (
    CocoTaskWriter,
    Instance,
    Skipped,
    TaskSource,
    YoloWriter,
    export_images,
    image_path,
    image_url,
    instances_to_results,
    pick_record,
)
from ovss_label.converters.ls_tasks import labels_by_image

S = 16
CAT = np.zeros((S, S), bool)
CAT[2:8, 2:8] = True
DOG = np.zeros((S, S), bool)
DOG[10:14, 10:14] = True
HOLED = np.zeros((S, S), bool)
HOLED[2:14, 2:14] = True
HOLED[6:10, 6:10] = False


def results(mask: np.ndarray, label: str, kind: Any = "brush", rid: str | None = None) -> list:
    items = instances_to_results([Instance(mask, label)], kind)
    if rid is not None:
        for item in items:
            item["id"] = rid
    return items


def task(tid: int | None, name: str, *result: Any, where: str = "annotations", **fields) -> dict:
    out = {"data": {"image": f"/data/upload/1/{name}"}, where: [{"id": 10, "result": list(result)}]}
    return out | ({"id": tid} if tid is not None else {}) | fields


def test_the_export_report_counts_every_task_image_region_and_skip(tmp_path: Path) -> None:
    flat = results(CAT, "dog", "polygon", rid="flat")[0]  # three points on one line: no pixel
    flat["value"]["points"] = [[50.0, 90.0], [60.0, 90.0], [70.0, 90.0]]
    wide = results(np.pad(CAT, ((0, 0), (0, 4))), "cat", "polygon", rid="wide")[0]  # 20 x 16
    bad = results(CAT, "cat", rid="bad")[0]
    bad["value"]["format"] = "png"
    two_fields = task(7, "g.png", *results(DOG, "dog"))
    two_fields["data"] = {"photo": "/data/upload/1/g.png", "thumb": "/data/upload/1/g-t.png"}
    tasks = [
        task(1, "a.png", *results(CAT, "cat"), where="predictions"),
        task(
            2,
            "b.png",
            "junk",
            {"type": "choices", "value": {"choices": ["day"]}},
            {"type": "choices", "value": {"choices": ["sunny"]}},
            {"value": {}},  # no type
            *results(CAT, "cat", "both"),  # `predict --format both`: one object, two results
            *results(HOLED, "dog"),
        ),
        {"id": 3, "data": {"image": "/data/upload/1/c.png"}},
        task(4, "d.png", *results(CAT, "cat")) | {"annotations": [{"was_cancelled": True}]},
        task(5, "e.png", bad, *results(CAT, "cat"), wide, flat),
        task(6, "f.png"),  # "nothing here", and no size anywhere
        two_fields,
        task(8, "b.png", *results(DOG, "dog")),  # the image of task 2 again
    ]
    source = TaskSource(tasks, include_predictions=True)
    coco = CocoTaskWriter(["cat"], segmentation="polygon")
    report = export_images(source, [coco, YoloWriter(tmp_path, ["cat"])], ["cat"])
    assert (report.tasks, report.unlabelled, report.from_predictions) == (8, 2, 1)
    assert (report.images, report.merged) == (4, 1)
    assert report.per_category == {"cat": 3, "dog": 2}
    assert report.other_results == {"choices": 2, "untyped": 1}
    assert report.holes_filled == {"COCO": 1, "YOLO": 1}
    assert report.extra_categories == ["dog"]
    label_file = tmp_path / "labels" / "upload" / "1" / "b.txt"
    assert report.skipped == [
        Skipped(5, "bad", "brush format 'png' is not supported (need 'rle')", "task 5"),
        Skipped(5, "wide", "region size 20x16 differs from image 16x16", "task 5"),
        Skipped(5, "flat", "empty region (no pixels)", "task 5"),
        Skipped(
            6,
            None,
            "image size unknown: no result or task meta has original_width/height; "
            "pass --image-dir",
            "task 6",
        ),
        Skipped(
            7,
            None,
            "cannot tell which data field is the image (['photo', 'thumb']); "
            "pass the label config or the data key",
            "task 7",
        ),
        Skipped(
            8, None, f"{label_file} already written from another task of the same image", "task 8"
        ),
    ]
    assert [im["file_name"] for im in coco.coco.images] == [f"upload/1/{n}.png" for n in "abeb"]


def test_image_sizes_come_from_results_then_meta_then_the_lookup() -> None:
    def meta(tid: int, width: Any, height: Any) -> dict:
        return task(tid, f"{tid}.png", meta={"original_width": width, "original_height": height})

    older = {"id": 1, "updated_at": "2024-01-01T00:00:00Z", "result": results(CAT, "cat")}
    latest = {"id": 2, "updated_at": "2024-02-01T00:00:00Z", "result": []}
    tasks = [
        meta(1, 1, 1),  # a 1-pixel image is an image
        meta(2, 0, S),
        meta(3, S, 0),
        meta(4, S, str(S)),
        {"id": 5, "data": {"image": "5.png"}, "annotations": [0, older, latest]},  # 0: junk
    ]
    source = TaskSource(tasks)
    sizes = [(im.task, im.width, im.height, im.regions) for im in source.images()]
    assert sizes == [("task 1", 1, 1, []), ("task 5", S, S, [])]  # the older record's size
    hint = "pass --image-dir"
    assert [(s.task_id, s.reason.endswith(hint)) for s in source.report.skipped] == [
        (2, True),
        (3, True),
        (4, True),
    ]
    # The lookup is asked for the task and its URL, and may not know the file either.
    found = {"/data/upload/1/2.png": (7, 5)}
    lookup = TaskSource(tasks, image_size=lambda t, url: found.get(url) if t["id"] == 2 else None)
    assert [(im.task, im.width, im.height) for im in lookup.images()][1] == ("task 2", 7, 5)
    reasons = [s.reason for s in lookup.report.skipped]
    assert len(reasons) == 2 and all(r.endswith("; image file not found") for r in reasons)


def test_the_size_is_the_exported_records_own_when_an_older_one_differs() -> None:
    # The image was replaced by a larger one after a first annotation: the latest annotation's
    # regions give the size, not the first result met in the task.
    wide = np.pad(CAT, ((0, 0), (0, 4)))  # 20 x 16
    older = {"id": 1, "updated_at": "2024-01-01T00:00:00Z", "result": results(CAT, "cat")}
    latest = {"id": 2, "updated_at": "2024-02-01T00:00:00Z", "result": results(wide, "cat")}
    source = TaskSource([{"id": 5, "data": {"image": "5.png"}, "annotations": [older, latest]}])
    (image,) = source.images()
    assert (image.width, image.height, len(image.regions)) == (S + 4, S, 1)
    assert source.report.skipped == []


def test_predictions_are_exported_only_when_asked() -> None:
    tasks = [task(1, "a.png", *results(CAT, "cat"), where="predictions")]
    source = TaskSource(tasks)
    assert list(source.images()) == [] and source.report.unlabelled == 1
    (image,) = TaskSource(tasks, include_predictions=True).images()
    assert [inst.label for _, inst in image.regions] == ["cat"]


def test_tasks_without_an_id_are_named_by_their_image_and_told_apart() -> None:
    def local(path: str, **data: str) -> dict:
        url = f"/data/local-files/?d={path}"
        meta = {"original_width": 4, "original_height": 4}
        return {"data": {"photo": url, "thumb": "t.png"} | data, "meta": meta, "annotations": [{}]}

    tasks = [local("x/p.jpg"), local("x/./p.jpg"), local("./x/p.jpg"), local("x/p.jpg")]
    tasks.append({"data": {"other": "y.jpg"}, "annotations": [{}]})
    source = TaskSource(tasks, data_key="photo")
    images = [(im.task, im.file_name) for im in source.images()]
    assert images == [
        ("image x/p.jpg", "x/p.jpg"),
        ("image x/p.jpg", "x/p-2.jpg"),  # another URL for the same path
        ("image x/p.jpg", "x/p-3.jpg"),
        ("image x/p.jpg", "x/p.jpg"),  # the same URL: the same image
    ]
    assert source.report.skipped == [
        Skipped(None, None, "no data field 'photo'", "task #5 in the file")
    ]


def test_the_image_field_is_image_else_the_only_string() -> None:
    assert image_url({"data": {"image": "a.jpg", "thumb": "b.jpg"}}) == "a.jpg"
    assert image_url({"data": {"img": "a.jpg", "size": 3}}) == "a.jpg"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("https://host/get?d=x.jpg", "get"),  # ?d= means a file only for local-files
        ("https://host/a/b.jpg", "a/b.jpg"),
        ("photos\\sub\\a.jpg", "photos/sub/a.jpg"),
        ("/data/upload/../../etc/./a.jpg", "upload/etc/a.jpg"),  # never leaves its folder
        ("https://host:8080/", "host_8080"),
        ("file://localhost/photos/a%20b.jpg", "photos/a b.jpg"),  # the host is not a folder
        ("", "image"),
    ],
)
def test_image_path(url: str, path: str) -> None:
    assert image_path(url) == path


def test_the_latest_record_wins_by_id_when_no_time_tells() -> None:
    first, second = {"id": 7, "result": []}, {"id": 3, "result": []}
    assert pick_record({"annotations": [second, first]}) == (first, "annotation")
    named = {"id": "imported", "result": []}  # not a number: older than any numbered record
    assert pick_record({"annotations": [named, second]}) == (second, "annotation")
    one = {"id": 1, "result": []}  # Label Studio's first id still beats no number
    assert pick_record({"annotations": [named, one]}) == (one, "annotation")


def test_labels_by_image_reads_every_image_labelling_control() -> None:
    keypoint = {"type": "keypointlabels", "value": {"keypointlabels": ["nose"]}}
    unclear = task(1, "a.png", *results(CAT, "cat"))
    unclear["data"] = {"photo": "a.png", "thumb": "a-t.png"}
    good = task(2, "b.png", *results(CAT, "cat"), keypoint)
    tasks: list[Any] = ["junk", unclear, good]  # a stray item, a task with no clear image field
    assert labels_by_image(tasks) == {"b.png": ["cat", "nose"]}


def test_what_is_not_a_label_studio_task_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"^this looks like a JSON-MIN export; export the project as JSON instead$"
    ):
        TaskSource([{"id": 1, "image": "/data/upload/1/a.png", "brush": []}])
    # An "image" key beside a "data" that is not an object is not a JSON-MIN export.
    for item in ({"id": 1}, "photos/image.jpg", {"image": "a.png", "data": "a.png"}):
        with pytest.raises(
            ValueError,
            match=r"not a Label Studio task \(no 'data' object\): " + re.escape(str(item)),
        ):
            TaskSource([item])  # type: ignore[list-item]
    long = {"id": 1, "note": "x" * 200}
    shown = re.escape(str(long)[:80])  # the item's first 80 characters
    with pytest.raises(
        ValueError, match=rf"^not a Label Studio task \(no 'data' object\): {shown}$"
    ):
        TaskSource([long])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="prefer must be one of"):
        TaskSource([], prefer="mask")  # type: ignore[arg-type]
