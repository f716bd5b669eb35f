"""``ovss-label import --coco``: COCO to Label Studio tasks, validated and round-tripped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import LS_EXPORT, disc, iou
from label_studio_sdk.label_interface import LabelInterface

from ovss_label.cli import cli
from ovss_label.converters import (
    CocoWriter,
    Instance,
    read_coco,
    result_to_instance,
    write_json_atomic,
)


def run(*args: str) -> None:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "coco.json"
    run("export", "--coco", str(LS_EXPORT), "-o", str(out))
    return out


def import_(coco: Path, tmp_path: Path, *options: str) -> tuple[list[dict], str]:
    out = tmp_path / "tasks.json"
    run("import", "--coco", str(coco), "-o", str(out), *options)
    config = (tmp_path / "tasks.label_config.xml").read_text()
    return json.loads(out.read_text()), config


def test_tasks_validate_and_masks_round_trip(exported: Path, tmp_path: Path) -> None:
    tasks, config = import_(exported, tmp_path)
    interface = LabelInterface(config)
    # The rotated rectangle went to COCO as its 4-corner polygon, and comes back as one.
    assert {c.tag for c in interface.controls} == {"BrushLabels", "PolygonLabels"}
    _, images = read_coco(exported)
    assert len(tasks) == len(images) == 5
    for task, image in zip(tasks, images, strict=True):
        assert task["data"]["image"] == image.extra["ls_image_url"]
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "coco-import"
        assert interface.validate_prediction(prediction)
        # A multi-ring COCO polygon becomes one Label Studio polygon per ring: compare per label.
        back = [result_to_instance(r) for r in prediction["result"]]
        for want in image.instances:
            got = [b.mask for b in back if b is not None and b.label == want.label]
            assert got and iou(np.logical_or.reduce(got), want.mask) == 1.0, want.label
        assert len(back) == sum(len(i.polygons or [None]) for i in image.instances)


def test_formats_and_image_root(exported: Path, tmp_path: Path) -> None:
    tasks, config = import_(
        exported, tmp_path, "--format", "brush", "--image-root", "s3://bucket/img"
    )
    # --image-root is joined with the image's path in the COCO file (Label Studio's upload path).
    assert tasks[0]["data"]["image"] == "s3://bucket/img/upload/7/3f2a1b4c-street.jpg"
    types = {r["type"] for t in tasks for r in t["predictions"][0]["result"]}
    assert types == {"brushlabels"}
    assert {c.tag for c in LabelInterface(config).controls} == {"BrushLabels"}
    tasks, _ = import_(exported, tmp_path, "--format", "polygon")
    types = {r["type"] for t in tasks for r in t["predictions"][0]["result"]}
    assert types == {"polygonlabels"}


def test_plain_coco_dataset_with_scores(tmp_path: Path) -> None:
    writer = CocoWriter(["apple", "pear"], segmentation="rle")
    image = writer.add_image("fruit/1.jpg", 50, 40)
    writer.add_instance(image, Instance(disc(40, 50, 20, 20, 9), "pear", score=0.4))
    writer.add_instance(image, Instance(disc(40, 50, 35, 20, 5), "apple", score=0.8))
    data = writer.to_dict()
    box = {
        "id": 9,
        "image_id": image,
        "category_id": 1,
        "bbox": [2, 4, 10, 6],
        "area": 60,
        "iscrowd": 0,
    }
    data["annotations"].append(box)  # detection-only annotation: no segmentation
    coco = tmp_path / "plain.json"
    write_json_atomic(coco, data)
    tasks, config = import_(
        coco, tmp_path, "--image-root", "/data/local-files/?d=", "--model-version", "v2"
    )
    (task,) = tasks
    assert task["data"]["image"] == "/data/local-files/?d=fruit/1.jpg"
    assert task["predictions"][0]["score"] == pytest.approx(0.6)
    results = task["predictions"][0]["result"]
    assert [r.get("score") for r in results] == [0.4, 0.8, None]
    assert results[2]["type"] == "rectanglelabels"
    assert results[2]["value"] | {"rectanglelabels": 0} == {
        "x": 4.0,
        "y": 10.0,
        "width": 20.0,
        "height": 15.0,
        "rotation": 0.0,
        "rectanglelabels": 0,
    }
    interface = LabelInterface(config)
    assert [c.labels for c in interface.controls] == [["apple", "pear"], ["apple", "pear"]]
    assert interface.validate_prediction(task["predictions"][0])
    mask = result_to_instance(task["predictions"][0]["result"][0])
    assert mask is not None and np.array_equal(mask.mask, disc(40, 50, 20, 20, 9))


def test_bad_coco_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1}]}))
    result = CliRunner().invoke(cli, ["import", "--coco", str(bad), "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 1 and "not a COCO instances file" in result.output
    twice = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}],
    }
    bad.write_text(json.dumps(twice))
    result = CliRunner().invoke(cli, ["import", "--coco", str(bad), "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 1 and "more than once" in result.output
