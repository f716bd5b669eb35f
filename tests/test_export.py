"""``ovss-label export --coco`` on a realistic Label Studio export: from a file and live."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner, Result
from helpers import LABEL_CONFIG, LS_EXPORT, fill_holes, iou, load_export, source_mask
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovss_label.cli import cli
from ovss_label.commands import export as export_cmd
from ovss_label.converters import pick_record


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def export(tmp_path: Path, *options: str, source: Path = LS_EXPORT) -> dict[str, Any]:
    out = tmp_path / "coco.json"
    result = run("export", "--coco", str(source), "-o", str(out), *options)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def decode(ann: dict, image: dict) -> np.ndarray:
    h, w = image["height"], image["width"]
    seg = ann["segmentation"]
    rle = (
        coco_mask.merge(coco_mask.frPyObjects(seg, h, w))
        if isinstance(seg, list)
        else {"size": seg["size"], "counts": seg["counts"].encode()}
    )
    return coco_mask.decode(rle).astype(bool)


PICKED = {101: ("annotations", 2), 102: ("annotations", 4), 103: ("annotations", 5),
          105: ("annotations", 7), 107: ("annotations", 8)}  # fmt: skip
"""Task id -> the record its export must use, read off the fixture by hand (the rule is in
``ls_tasks``' docstring): 101 has annotation 1, 2 (updated a day later) and 3 (newest but
cancelled); 103's only annotation is empty, which wins over its prediction; 104 has only a
cancelled annotation; 106 has nothing."""
PICKED_WITH_PREDICTIONS = {**PICKED, 104: ("predictions", 10)}
"""With ``--include-predictions``: 104 falls back to its prediction; 103 keeps its annotation."""


def source_regions(picked: dict[int, tuple[str, int]] = PICKED) -> dict[tuple[int, str], dict]:
    """(task id, label) -> the expected record's result of that label (one per label here)."""
    regions = {}
    for task in load_export():
        if task["id"] not in picked:
            continue
        kind, record_id = picked[task["id"]]
        (record,) = [r for r in task[kind] if r["id"] == record_id]
        for result in record["result"]:
            if result["type"] in ("brushlabels", "polygonlabels") and "original_width" in result:
                regions[(task["id"], result["value"][result["type"]][0])] = result
    return regions


def test_export_loads_in_pycocotools_and_scores_ap_1(tmp_path: Path) -> None:
    coco = export(tmp_path, "--label-config", str(LABEL_CONFIG))
    path = tmp_path / "coco.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        detections = [a | {"score": 1.0} for a in coco["annotations"]]
        evaluation = COCOeval(gt, gt.loadRes(detections), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog", "person", "car", "tree"]
    names = [im["file_name"] for im in coco["images"]]
    # Paths, not base names: uploads under Label Studio's media folder, local files relative
    # to the document root (URL-decoded).
    assert names == [
        "upload/7/3f2a1b4c-street.jpg",
        "photos/park east.png",
        "upload/7/aa11bb22-empty.jpg",
        "upload/7/ee55ff66-broken.jpg",
        "upload/7/12345678-editor.jpg",
    ]
    assert [im["ls_task_id"] for im in coco["images"]] == [101, 102, 103, 105, 107]


HAVE_HOLES = {(101, "dog"), (107, "cat")}


@pytest.mark.parametrize("mode", ["auto", "rle", "polygon"])
def test_every_exported_mask_matches_its_source(tmp_path: Path, mode: str) -> None:
    coco = export(tmp_path, "--segmentation", mode)
    images = {im["id"]: im for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    sources = source_regions()
    checked = 0
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        key = (image["ls_task_id"], names[ann["category_id"]])
        if key not in sources:
            continue  # rectangles: checked below
        expected = source_mask(sources[key])
        score = iou(decode(ann, image), expected)
        if isinstance(ann["segmentation"], dict):
            assert score == 1.0, key
        elif mode == "polygon" and key in HAVE_HOLES:
            # COCO polygons cannot hold holes: the outline is exact, the holes are filled.
            assert iou(decode(ann, image), fill_holes(expected)) >= 0.98, key
            assert not np.array_equal(fill_holes(expected), expected)
        else:
            assert score >= 0.98, key
        checked += 1
    assert checked == 7


def test_auto_mode_choices_and_structure(tmp_path: Path) -> None:
    coco = export(tmp_path)
    # Without a label config, categories are the labels met, sorted.
    assert [c["name"] for c in coco["categories"]] == ["car", "cat", "dog", "person", "tree"]
    by_task: dict[int, list[dict]] = {}
    tasks = {im["id"]: im["ls_task_id"] for im in coco["images"]}
    for ann in coco["annotations"]:
        by_task.setdefault(tasks[ann["image_id"]], []).append(ann)
    dog = [a for a in by_task[101] if isinstance(a["segmentation"], dict)]
    assert len(dog) == 1  # only the ring (a hole) is RLE
    person = [a for a in by_task[102] if len(a["segmentation"]) == 2]
    assert len(person) == 1  # one annotation, two polygons: the two parts
    assert 103 not in by_task  # empty annotation: image without annotations
    assert all(a["iscrowd"] == 0 for a in coco["annotations"])
    # task 101: the latest annotation (2), not the older one nor the newer cancelled one
    assert len(by_task[101]) == 3
    rect = [
        a for a in by_task[102] if len(a["segmentation"]) == 1 and len(a["segmentation"][0]) == 8
    ]
    assert len(rect) == 1 and rect[0]["area"] == pytest.approx(0.3 * 64 * 0.2 * 48, rel=0.15)


def test_bad_records_are_reported_and_skipped(tmp_path: Path) -> None:
    out = tmp_path / "coco.json"
    result = run("export", "--coco", str(LS_EXPORT), "-o", str(out))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "task 105 region bad1: undecodable brush RLE" in text
    assert "task 105 region bad2: result has no original_width" in text
    coco = json.loads(out.read_text())
    broken = next(im for im in coco["images"] if im["ls_task_id"] == 105)
    assert [a["image_id"] for a in coco["annotations"]].count(broken["id"]) == 1
    failing = run("export", "--coco", str(LS_EXPORT), "-o", str(out), "--fail-on-skip")
    assert failing.exit_code == 1


EXPORTED_LABELS = {
    (101, "cat"), (101, "dog"), (101, "car"),  # annotation 2's three regions
    (102, "person"), (102, "tree"), (102, "car"),  # the car is a rectangle
    (105, "car"),  # its other two regions are broken (reported, skipped)
    (107, "cat"),
}  # fmt: skip
"""(task id, label) of every exported annotation, by hand: task 103's empty annotation exports
nothing, and no label comes from annotation 1 or the cancelled annotation 3 (a dog)."""


@pytest.mark.parametrize("predictions", [False, True])
def test_each_task_exports_the_record_picked_by_hand(tmp_path: Path, predictions: bool) -> None:
    """The exported labels and masks are those of ``PICKED``'s records, from no other one."""
    picked, labels = PICKED, EXPORTED_LABELS
    if predictions:
        picked, labels = PICKED_WITH_PREDICTIONS, EXPORTED_LABELS | {(104, "dog")}
    options = ("--include-predictions",) if predictions else ()
    coco = export(tmp_path, "--segmentation", "rle", *options)
    images = {im["id"]: im for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    exported: dict[tuple[int, str], list[np.ndarray]] = {}
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        key = (image["ls_task_id"], names[ann["category_id"]])
        exported.setdefault(key, []).append(decode(ann, image))
    assert exported.keys() == labels and all(len(m) == 1 for m in exported.values())
    sources = source_regions(picked)
    for key in labels - {(102, "car")}:  # the rectangle: checked in the test of auto mode
        np.testing.assert_array_equal(exported[key][0], source_mask(sources[key]), err_msg=str(key))


def test_pick_record_follows_the_documented_order() -> None:
    """Latest ``updated_at``, then ``created_at``, then ``id``; cancelled never; an empty
    annotation over any prediction; predictions only when asked, the latest one."""

    def ann(i: int, updated: str | None, created: str | None = None, **extra: Any) -> dict:
        return {"id": i, "updated_at": updated, "created_at": created, "result": [], **extra}

    day = "2026-03-0{}T10:00:00Z".format
    cases = [
        ([ann(1, day(2), day(1)), ann(2, day(1), day(3))], [], False, ("annotation", 1)),
        ([ann(1, day(2), day(3)), ann(2, day(2), day(1))], [], False, ("annotation", 1)),
        ([ann(7, day(2), day(1)), ann(3, day(2), day(1))], [], False, ("annotation", 7)),
        ([ann(1, day(1)), ann(2, day(9), was_cancelled=True)], [], False, ("annotation", 1)),
        ([ann(1, None), ann(2, "not a date"), ann(3, day(1))], [], False, ("annotation", 3)),
        ([ann(1, day(1))], [ann(9, None, day(5))], True, ("annotation", 1)),
        ([ann(1, day(9), was_cancelled=True)], [ann(9, None, day(5))], False, None),
        ([ann(1, day(9), was_cancelled=True)], [ann(8, None, day(6)), ann(9, None, day(5))],
         True, ("prediction", 8)),
        ([], [], True, None),
    ]  # fmt: skip
    for anns, preds, include, expected in cases:
        record, kind = pick_record({"annotations": anns, "predictions": preds}, include)
        got = (kind, record["id"]) if record is not None else None
        assert got == expected, (anns, preds, include)
        assert record is not None or kind == ""


def test_include_predictions_labels_tasks_without_annotations(tmp_path: Path) -> None:
    coco = export(tmp_path, "--include-predictions")
    image = next(im for im in coco["images"] if im["ls_task_id"] == 104)
    (ann,) = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    assert ann["score"] == 0.6


def test_image_dir_gives_sizes_of_unannotated_images(tmp_path: Path) -> None:
    photo = tmp_path / "imgs" / "0a0b0c0d-todo.jpg"
    photo.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: Label Studio shows it 30 wide, 40 high
    Image.new("RGB", (40, 30)).save(photo, exif=exif)
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/upload/7/0a0b0c0d-todo.jpg"},
            "annotations": [{"id": 1, "result": [], "was_cancelled": False}],
        }
    ]
    source = tmp_path / "tasks.json"
    source.write_text(json.dumps(tasks))
    assert export(tmp_path, source=source)["images"] == []
    coco = export(tmp_path, "--image-dir", str(photo.parent), source=source)
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(30, 40)]


def test_image_dir_is_searched_by_path_first(tmp_path: Path) -> None:
    for folder, size in (("photos", (40, 30)), ("photos2", (20, 10))):
        (tmp_path / "imgs" / folder).mkdir(parents=True)
        Image.new("RGB", size).save(tmp_path / "imgs" / folder / "a.png")
    tasks = [
        empty(f"/data/local-files/?d={d}/a.png", id=i) for i, d in enumerate(["photos2", "photos"])
    ]
    source = write_tasks(tmp_path, tasks)
    coco = export(tmp_path, "--image-dir", str(tmp_path / "imgs"), source=source)
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(20, 10), (40, 30)]


def test_usage_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "o.json")
    assert "--coco" in run("export", str(LS_EXPORT), "-o", out).output
    both = run("export", "--coco", str(LS_EXPORT), "--project", "3", "-o", out)
    assert both.exit_code != 0 and "either SOURCE" in both.output
    minimal = tmp_path / "min.json"
    minimal.write_text(json.dumps([{"image": "/data/upload/1/a.jpg", "id": 1, "label": []}]))
    result = run("export", "--coco", str(minimal), "-o", out)
    assert result.exit_code != 0 and "JSON-MIN" in result.output
    garbage = tmp_path / "g.json"
    garbage.write_text("[{")
    assert "not a JSON file" in run("export", "--coco", str(garbage), "-o", out).output


def write_tasks(tmp_path: Path, tasks: list[dict]) -> Path:
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(tasks))
    return path


def empty(url: str, **fields: Any) -> dict:
    """A task whose latest annotation says "nothing here"."""
    return {"data": {"image": url}, "annotations": [{"id": 1, "result": []}], **fields}


def test_file_names_keep_paths_so_equal_base_names_stay_apart(tmp_path: Path) -> None:
    urls = [
        "/data/local-files/?d=photos/a.png",
        "/data/local-files/?d=photos2/a.png",
        "/data/upload/3/abc-a.png",
        "http://one.test/img/a.png",
        "http://two.test:8080/img/a.png",  # same path, another host: a different file
        "s3://bucket/img/a.png",
        "/data/local-files/?d=photos/a.png",  # the same file again: the same name
    ]
    meta = {"original_width": 4, "original_height": 3}
    tasks = [empty(u, id=i, meta=meta) for i, u in enumerate(urls, 1)]
    coco = export(tmp_path, source=write_tasks(tmp_path, tasks))
    assert [im["file_name"] for im in coco["images"]] == [
        "photos/a.png",
        "photos2/a.png",
        "upload/3/abc-a.png",
        "img/a.png",
        "two.test_8080/img/a.png",
        "bucket/img/a.png",
        "photos/a.png",
    ]
    assert [im["ls_image_url"] for im in coco["images"]] == urls


def test_sizes_come_from_results_then_task_meta_without_image_dir(tmp_path: Path) -> None:
    square = [[10.0, 10.0], [50.0, 10.0], [50.0, 50.0], [10.0, 50.0]]
    polygon = {
        "id": "p1",
        "type": "polygonlabels",
        "original_width": 80,
        "original_height": 60,
        "value": {"points": square, "polygonlabels": ["car"]},
    }
    tasks = [
        # `predict` output for an image with nothing found: the size is only in meta
        {
            "data": {"image": "/data/local-files/?d=p/none.png"},
            "meta": {"original_width": 40, "original_height": 30},
            "predictions": [{"model_version": "m", "result": []}],
        },
        # results come first: this meta is wrong on purpose
        {
            "id": 2,
            "data": {"image": "/data/local-files/?d=p/car.png"},
            "meta": {"original_width": 1, "original_height": 1},
            "annotations": [{"id": 5, "result": [polygon]}],
        },
    ]
    coco = export(tmp_path, "--include-predictions", source=write_tasks(tmp_path, tasks))
    assert [(im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [
        ("p/none.png", 40, 30),
        ("p/car.png", 80, 60),
    ]
    assert "ls_task_id" not in coco["images"][0]  # a task without id: no null id
    (ann,) = coco["annotations"]
    assert ann["area"] == 32 * 24  # pycocotools: 40% x 40% of 80 x 60


def test_skipped_tasks_are_named_by_id_image_or_position(tmp_path: Path) -> None:
    tasks = [
        {"data": {"image": "/data/local-files/?d=p/no-size.png"}, "annotations": [{"result": []}]},
        {"data": {"a": "x.png", "b": "y.png"}, "annotations": [{"result": []}]},
        empty("/data/upload/1/z.png", id=9),
    ]
    out = tmp_path / "coco.json"
    result = run("export", "--coco", str(write_tasks(tmp_path, tasks)), "-o", str(out))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "None" not in text
    assert "skipped image p/no-size.png: image size unknown" in text
    assert "skipped task #2 in the file: cannot tell which data field" in text
    assert "skipped task 9: image size unknown" in text
    assert json.loads(out.read_text())["images"] == []


class FakeLabelStudio:
    """Label Studio's API as an httpx transport: version, project and export endpoints."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.auth: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("Authorization", ""))
        if self.status != 200:
            return httpx.Response(self.status, json={"detail": "nope"})
        path = request.url.path
        if path == "/api/version/":
            return httpx.Response(200, json={"release": "1.23.2", "edition": "Community"})
        if path == "/api/projects/7/":
            return httpx.Response(
                200, json={"id": 7, "title": "p", "label_config": LABEL_CONFIG.read_text()}
            )
        if path == "/api/projects/7/export":
            assert request.url.params["download_all_tasks"] == "true"
            return httpx.Response(200, content=LS_EXPORT.read_bytes())
        return httpx.Response(404, json={"detail": "not found"})


def _patch_client(monkeypatch: pytest.MonkeyPatch, fake: FakeLabelStudio) -> None:
    real = export_cmd.make_client

    def make_client(url: str, api_key: str) -> Any:
        return real(url, api_key, httpx_client=httpx.Client(transport=httpx.MockTransport(fake)))

    monkeypatch.setattr(export_cmd, "make_client", make_client)


def test_live_project_export_matches_file_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeLabelStudio()
    _patch_client(monkeypatch, fake)
    out = tmp_path / "live.json"
    result = run(
        "export",
        "--coco",
        "--url",
        "http://ls.test:8080",
        "--api-key",
        "abc123",
        "--project",
        "7",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert set(fake.auth) == {"Token abc123"}
    from_file = export(tmp_path, "--label-config", str(LABEL_CONFIG))
    assert json.loads(out.read_text()) == from_file


def test_live_export_401_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_client(monkeypatch, FakeLabelStudio(status=401))
    result = run(
        "export",
        "--coco",
        "--url",
        "http://ls.test",
        "--api-key",
        "bad",
        "--project",
        "7",
        "-o",
        str(tmp_path / "o.json"),
    )
    assert result.exit_code == 1 and "refused the API key (401)" in result.output
    assert "Traceback" not in result.output


def _result(kind: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "value": value, "original_width": 4, "original_height": 4}


def test_record_labels_are_the_labels_regions_are_exported_with() -> None:
    from ovss_label.converters.ls_tasks import IMAGE_RESULT_TYPES, record_labels

    record = {
        "result": [
            _result("brushlabels", {"brushlabels": ["cat"], "rle": [1]}),
            _result("polygonlabels", {"polygonlabels": ["dog", "pet"], "points": []}),
            _result("rectanglelabels", {"labels": ["car"]}),  # the generic key, as LS may write
            _result("keypointlabels", {"keypointlabels": ["nose"]}),
            _result("choices", {"choices": ["blurry"]}),
            "not a result",
        ]
    }
    assert record_labels(record) == {"cat", "dog", "car"}  # exported region types only
    assert record_labels(record, IMAGE_RESULT_TYPES) == {"cat", "dog", "car", "nose"}
    assert record_labels(None) == set() and record_labels({"result": None}) == set()


def test_labels_by_image_reads_each_tasks_annotation() -> None:
    from ovss_label.converters.ls_tasks import TaskSource, labels_by_image

    tasks = load_export()
    by_image = labels_by_image(tasks)
    assert by_image == {  # base names, as ``tune`` matches files; unquoted
        "3f2a1b4c-street.jpg": ["car", "cat", "dog"],
        "park east.png": ["car", "person", "tree"],
        "ee55ff66-broken.jpg": ["car", "cat", "tree"],
        "12345678-editor.jpg": ["cat"],
    }
    assert TaskSource(tasks).labels() == sorted({n for v in by_image.values() for n in v})
    predicted = {"data": {"image": "/data/upload/1/p.jpg"}, "predictions": [{"result": [
        _result("brushlabels", {"brushlabels": ["cat"]})]}]}  # fmt: skip
    unknown = {"data": {"a": "x.jpg", "b": "y.jpg"}, "annotations": [{"result": [
        _result("brushlabels", {"brushlabels": ["cat"]})]}]}  # fmt: skip
    assert labels_by_image([predicted, unknown, {"no": "data"}]) == {}
