"""``ovss-label export --yolo`` / ``--labelme``: files read back with independent decoders.

YOLO lines and LabelMe polygons are rasterised with pycocotools, LabelMe masks decoded as
labelme does (base64 PNG pasted at ``[y1:y2 + 1, x1:x2 + 1]``), and compared with the source
masks decoded by the Label Studio SDK.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import LABEL_CONFIG, LS_EXPORT, coco_raster, disc, fill_holes, iou, source_mask
from PIL import Image

from ovss_label.cli import cli
from ovss_label.converters import Instance, instances_to_results, polygons_to_mask
from ovss_label.converters.labelme import LabelmeWriter, instance_shapes
from ovss_label.converters.ls_tasks import ExportReport, TaskImage
from ovss_label.converters.yolo import YoloWriter, yolo_lines

NAMES = ["cat", "dog", "person", "car", "tree"]  # label_config.xml order
# Fixture tasks: the latest non-cancelled annotation of each, and where its files go.
CHOSEN = {101: 2, 102: 4, 103: 5, 105: 7, 107: 8}
STEMS = {
    101: "upload/7/3f2a1b4c-street",
    102: "photos/park east",
    103: "upload/7/aa11bb22-empty",
    105: "upload/7/ee55ff66-broken",
    107: "upload/7/12345678-editor",
}


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def sources(task_id: int) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """label -> union of the chosen annotation's decodable brush/polygon masks; (H, W)."""
    task = next(t for t in json.loads(LS_EXPORT.read_text()) if t["id"] == task_id)
    record = next(a for a in task["annotations"] if a["id"] == CHOSEN[task_id])
    masks: dict[str, np.ndarray] = {}
    size = (0, 0)
    for result in record["result"]:
        if result["type"] not in ("brushlabels", "polygonlabels") or result["id"] == "bad2":
            continue  # rectangles, text; a polygon without a size
        try:
            mask = np.ascontiguousarray(source_mask(result))  # floodFill needs C order
        except Exception:  # the fixture's undecodable brush (the SDK fails in its own way)
            continue
        label = result["value"][result["type"]][0]
        masks[label] = masks.get(label, np.zeros_like(mask)) | mask
        size = mask.shape
    return masks, size


def yolo_masks(path: Path, h: int, w: int) -> dict[int, np.ndarray]:
    """class -> union of its lines, rasterised by pycocotools at the image size."""
    out: dict[int, np.ndarray] = {}
    for line in path.read_text().splitlines():
        cls, *coords = line.split()
        xy = np.array(coords, dtype=float).reshape(-1, 2)
        assert len(xy) >= 3 and ((xy >= 0) & (xy <= 1)).all(), line
        ring = (xy * [w, h]).ravel().tolist()
        out[int(cls)] = out.get(int(cls), np.zeros((h, w), bool)) | coco_raster([ring], h, w)
    return out


def shape_mask(shape: dict, h: int, w: int) -> np.ndarray:
    """One LabelMe shape as labelme's ``shapes_to_label`` draws masks, polygons by pycocotools."""
    if shape["shape_type"] == "polygon":
        assert shape["mask"] is None
        return coco_raster([[c for point in shape["points"] for c in point]], h, w)
    assert shape["shape_type"] == "mask"
    crop = np.array(Image.open(io.BytesIO(base64.b64decode(shape["mask"])))).astype(bool)
    (x1, y1), (x2, y2) = np.asarray(shape["points"]).astype(int)
    assert crop.shape == (y2 - y1 + 1, x2 - x1 + 1)  # what labelme's paste needs
    out = np.zeros((h, w), bool)
    out[y1 : y2 + 1, x1 : x2 + 1] = crop
    return out


def test_yolo_export_of_a_label_studio_project(tmp_path: Path) -> None:
    out = tmp_path / "yolo"
    run("export", str(LS_EXPORT), "--yolo", str(out), "--label-config", str(LABEL_CONFIG))
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(NAMES)) and data["nc"] == 5
    assert (data["train"], data["val"]) == ("images", "images")
    files = sorted(p.relative_to(out / "labels").as_posix() for p in out.rglob("*.txt"))
    assert files == sorted(f"{stem}.txt" for stem in STEMS.values())
    assert (out / "labels" / f"{STEMS[103]}.txt").read_text() == ""  # nothing in this image
    compared = 0
    for task_id, stem in STEMS.items():
        masks, (h, w) = sources(task_id)
        written = yolo_masks(out / "labels" / f"{stem}.txt", h, w) if h else {}
        for label, mask in masks.items():
            # YOLO has no holes: outer rings only, so compare with the holes filled.
            assert iou(written[NAMES.index(label)], fill_holes(mask)) >= 0.9, (task_id, label)
            compared += 1
    assert compared == 7  # 101: cat, dog, car; 102: person, tree; 105: a polygon; 107: cat


def test_labelme_export_of_a_label_studio_project(tmp_path: Path) -> None:
    out = tmp_path / "labelme"
    run("export", str(LS_EXPORT), "--labelme", str(out))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert files == sorted(f"{stem}.json" for stem in STEMS.values())
    for task_id, stem in STEMS.items():
        doc = json.loads((out / f"{stem}.json").read_text())
        assert list(doc) == [
            "version",
            "flags",
            "shapes",
            "imagePath",
            "imageData",
            "imageHeight",
            "imageWidth",
        ]
        assert doc["version"].startswith("5.") and doc["imageData"] is None
        assert doc["imagePath"] == Path(stem).name + (".png" if task_id == 102 else ".jpg")
        masks, _ = sources(task_id)
        h, w = doc["imageHeight"], doc["imageWidth"]
        for label, mask in masks.items():
            shapes = [s for s in doc["shapes"] if s["label"] == label]
            drawn = np.logical_or.reduce([shape_mask(s, h, w) for s in shapes])
            if mask_has_hole := not np.array_equal(fill_holes(mask), mask):
                assert {s["shape_type"] for s in shapes} == {"mask"}  # exact, holes kept
            assert iou(drawn, mask) >= (1.0 if mask_has_hole else 0.95), (task_id, label)
    assert json.loads((out / f"{STEMS[103]}.json").read_text())["shapes"] == []


H, W = 90, 120
SMOOTH = [
    Instance(disc(H, W, 30, 30, 18), "cat", 0.9),
    Instance(disc(H, W, 85, 25, 15) | disc(H, W, 85, 70, 12), "dog", 0.8),  # two parts
    Instance(disc(H, W, 35, 70, 14), "cat", 0.7),
]


def predicted(url: str, instances: list[Instance]) -> dict:
    """A task as `ovss-label predict --format both` writes it (no id, size in meta)."""
    prediction = {"model_version": "m", "result": instances_to_results(instances, "both")}
    meta = {"original_width": W, "original_height": H}
    return {"data": {"image": url}, "meta": meta, "predictions": [prediction]}


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    tasks = [
        predicted("/data/local-files/?d=photos/a.png", SMOOTH),
        predicted("/data/local-files/?d=photos2/a.png", []),  # same base name, nothing found
    ]
    source = tmp_path / "tasks.json"
    source.write_text(json.dumps(tasks))
    outputs = ["--yolo", str(tmp_path / "y"), "--labelme", str(tmp_path / "l")]
    run("export", str(source), "--include-predictions", "--segmentation", "polygon", *outputs)
    return tmp_path


def test_yolo_round_trip_of_predictions(exported: Path) -> None:
    names = yaml.safe_load((exported / "y" / "data.yaml").read_text())["names"]
    assert names == {0: "cat", 1: "dog"}  # no label config: the labels met, sorted
    lines = (exported / "y" / "labels" / "photos" / "a.txt").read_text().splitlines()
    assert [int(line.split()[0]) for line in lines] == [0, 1, 1, 0]  # one line per part
    for line, want in zip(lines, [SMOOTH[0].mask, None, None, SMOOTH[2].mask], strict=True):
        if want is not None:
            xy = np.array(line.split()[1:], dtype=float).reshape(-1, 2) * [W, H]
            assert iou(coco_raster([xy.ravel().tolist()], H, W), want) >= 0.9
    dog = yolo_masks(exported / "y" / "labels" / "photos" / "a.txt", H, W)[1]
    assert iou(dog, SMOOTH[1].mask) >= 0.9
    assert (exported / "y" / "labels" / "photos2" / "a.txt").read_text() == ""


def test_labelme_round_trip_of_predictions(exported: Path) -> None:
    doc = json.loads((exported / "l" / "photos" / "a.json").read_text())
    assert (doc["imagePath"], doc["imageHeight"], doc["imageWidth"]) == ("a.png", H, W)
    shapes = doc["shapes"]
    assert [s["shape_type"] for s in shapes] == ["polygon"] * 4
    # The two-part dog: two polygons, grouped as one instance; single-part shapes: no group.
    assert [s["group_id"] for s in shapes] == [None, 2, 2, None]
    assert [s["description"] for s in shapes] == ["score 0.9000"] + ["score 0.8000"] * 2 + [
        "score 0.7000"
    ]
    instances: dict[object, np.ndarray] = {}
    for i, shape in enumerate(shapes):
        key = shape["group_id"] if shape["group_id"] is not None else f"shape {i}"
        instances[key] = instances.get(key, np.zeros((H, W), bool)) | shape_mask(shape, H, W)
    for drawn, want in zip(instances.values(), SMOOTH, strict=True):
        assert iou(drawn, want.mask) >= 0.9
    empty = json.loads((exported / "l" / "photos2" / "a.json").read_text())
    assert empty["shapes"] == [] and empty["imagePath"] == "a.png"


def test_all_formats_in_one_run_and_usage_errors(tmp_path: Path) -> None:
    coco = tmp_path / "c.json"
    run("export", str(LS_EXPORT), "--coco", "-o", str(coco), "--yolo", str(tmp_path / "y"))
    assert len(json.loads(coco.read_text())["images"]) == len(STEMS)
    assert len(list((tmp_path / "y" / "labels").rglob("*.txt"))) == len(STEMS)
    result = CliRunner().invoke(cli, ["export", str(LS_EXPORT), "--coco"])
    assert result.exit_code == 2 and "-o/--output" in result.output
    result = CliRunner().invoke(cli, ["export", str(LS_EXPORT), "-o", str(coco)])
    assert result.exit_code == 2 and "--yolo DIR" in result.output


# Guarantees the converters' mutation run (issue 18) found untested ---------------------------

BALL = Instance(disc(96, 96, 48, 48, 44), "ball")
RING = Instance(disc(96, 96, 48, 48, 44) & ~disc(96, 96, 48, 48, 3), "ring")  # a small hole


def one_image(*instances: Instance) -> TaskImage:
    regions = [(f"r{i}", inst) for i, inst in enumerate(instances)]
    return TaskImage("task 1", 1, "/data/upload/1/a.png", "a.png", 96, 96, regions)


def test_writers_trace_masks_at_one_pixel_by_default(tmp_path: Path) -> None:
    # The same tolerance as the COCO export and Label Studio polygons: one pixel.
    assert yolo_lines(BALL, 0) == yolo_lines(BALL, 0, 1.0) != yolo_lines(BALL, 0, 2.0)
    one, two = instance_shapes(BALL, 1, "auto", 1.0), instance_shapes(BALL, 1, "auto", 2.0)
    assert instance_shapes(BALL, 1) == one != two
    yolo, labelme = YoloWriter(tmp_path / "y", ["ball"]), LabelmeWriter(tmp_path / "l")
    for writer in (yolo, labelme):
        writer.add(one_image(BALL), ExportReport())
    lines = (tmp_path / "y" / "labels" / "a.txt").read_text().splitlines()
    assert lines == yolo_lines(BALL, 0, 1.0)
    assert json.loads((tmp_path / "l" / "a.json").read_text())["shapes"] == one


def test_labelme_keeps_a_mask_with_a_hole_exact_by_default(tmp_path: Path) -> None:
    # "auto": a traced polygon would fill the hole (its IoU with the mask is still over 0.98),
    # so the mask is written as a mask shape.
    assert [s["shape_type"] for s in instance_shapes(RING, 1)] == ["mask"]
    LabelmeWriter(tmp_path).add(one_image(RING), ExportReport())
    (shape,) = json.loads((tmp_path / "a.json").read_text())["shapes"]
    assert shape["shape_type"] == "mask" and np.array_equal(shape_mask(shape, 96, 96), RING.mask)


def test_labelme_vertices_are_written_to_a_thousandth_of_a_pixel() -> None:
    ring = np.array([[10.123456, 5.0], [40.987654, 5.5], [20.0004, 30.25]])
    triangle = Instance(polygons_to_mask([ring], 96, 96), "t", polygons=(ring,))
    (shape,) = instance_shapes(triangle, 1)
    assert shape["points"] == [[10.123, 5.0], [40.988, 5.5], [20.0, 30.25]]


def test_yolo_data_yaml_reads_like_ultralytics_own(tmp_path: Path) -> None:
    writer = YoloWriter(tmp_path, ["cat", "dog"])
    writer.close()
    text = (tmp_path / "data.yaml").read_text(encoding="utf-8")
    assert text.splitlines()[:2] == [
        "# Written by ovss-label export --yolo. Put each image at images/<its path>, next to",
        "# labels/<same path>.txt; split into train/val folders if you need a split.",
    ]
    assert list(yaml.safe_load(text)) == ["train", "val", "nc", "names"]  # in this order
