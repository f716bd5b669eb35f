"""Hostile or odd records in Label Studio exports and COCO files: a clear error for that record,
never a crash, a traceback, a wrong label or an overwritten file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from ovss_label.cli import cli
from ovss_label.converters import Instance, read_coco
from ovss_label.converters.coco import CocoError
from ovss_label.converters.labelstudio import (
    MAX_REGION_PIXELS,
    RegionError,
    instances_to_results,
    result_to_instance,
)
from ovss_label.converters.ls_tasks import TaskSource, record_labels

POLYGON = {"type": "polygonlabels", "original_width": 40, "original_height": 30}
POINTS = [[10, 10], [50, 10], [50, 60]]


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ({**POLYGON, "value": {"points": [[1, 1], [None, 5], [5, 5]], "polygonlabels": ["a"]}},
         "not a finite number"),
        ({**POLYGON, "value": {"points": [[1, 1], [math.nan, 5], [5, 5]], "polygonlabels": ["a"]}},
         "not a finite number"),
        ({**POLYGON, "value": [1, 2]}, "value is a list, not an object"),
        ({"type": "rectanglelabels", "original_width": 40, "original_height": 30,
          "value": {"x": math.inf, "y": 1, "width": 3, "height": 3, "rectanglelabels": ["a"]}},
         "not a finite number"),
        ({**POLYGON, "original_width": 10**6, "original_height": 10**6,
          "value": {"points": POINTS, "polygonlabels": ["a"]}}, "not decoded"),
        ({**POLYGON, "original_width": "wide", "value": {"points": POINTS, "polygonlabels": ["a"]}},
         "not a size in pixels"),
        ({**POLYGON, "original_width": -4, "value": {"points": POINTS, "polygonlabels": ["a"]}},
         "not a size in pixels"),
    ],
)  # fmt: skip
def test_a_malformed_region_is_a_region_error(result, message):
    # NaN and null points used to reach pycocotools' rasteriser (a segfault / an OOM kill).
    with pytest.raises(RegionError, match=message):
        result_to_instance(result)


def test_the_pixel_cap_allows_a_large_real_image():
    assert MAX_REGION_PIXELS >= 16384 * 16384


def test_a_label_written_as_a_string_is_the_whole_name():
    result = {**POLYGON, "value": {"points": POINTS, "polygonlabels": "cat"}}
    assert result_to_instance(result).label == "cat"  # not "c"
    assert record_labels({"result": [result]}) == {"cat"}
    empty = {**POLYGON, "value": {"points": POINTS, "polygonlabels": "  "}}
    with pytest.raises(RegionError, match="no label"):
        result_to_instance(empty)


def test_an_export_with_a_malformed_value_skips_that_region_with_its_reason():
    mask = np.zeros((30, 40), bool)
    mask[2:9, 3:12] = True
    good = instances_to_results([Instance(mask, "cat")])
    bad = {**POLYGON, "id": "r9", "value": "oops"}
    task = {"id": 1, "data": {"image": "a.png"}, "annotations": [{"result": [*good, bad]}]}
    source = TaskSource([task])
    images = list(source.images())
    assert [inst.label for _, inst in images[0].regions] == ["cat"]
    assert [(s.region_id, s.reason) for s in source.report.skipped] == [
        ("r9", "value is a str, not an object")
    ]


COCO = {"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 3}],
        "categories": [{"id": 1, "name": "cat"}]}  # fmt: skip


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ([{"id": 5, "image_id": None, "category_id": 1, "bbox": [0, 0, 1, 1]}],
         "annotation 5 references a missing image"),
        ([{"id": 6, "image_id": "x", "category_id": 1}], "annotation 6 references a missing"),
        ([{"id": 7, "image_id": [1], "category_id": 1}], "annotation 7 references a missing"),
        ([7], r"annotation #1 is not an object \(int\)"),
        ("nope", "annotations is not a list"),
        ([{"id": 8, "image_id": 1, "category_id": 1,
           "segmentation": {"size": [5, 5], "counts": "abc"}}],
         r"annotation 8: RLE size \[5, 5\] != image \[3, 4\]"),
    ],
)  # fmt: skip
def test_a_bad_coco_annotation_is_a_coco_error_naming_it(annotations, message, tmp_path):
    with pytest.raises(CocoError, match=message):
        read_coco({**COCO, "annotations": annotations})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**COCO, "annotations": annotations}))
    result = CliRunner().invoke(cli, ["import", "--coco", str(path), "-o", str(tmp_path / "t")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_two_images_with_one_stem_do_not_overwrite_each_others_yolo_or_labelme_file(tmp_path):
    tasks = []
    for i, name in enumerate(("a.jpg", "a.png")):
        mask = np.zeros((30, 40), bool)
        mask[i * 10 : i * 10 + 8, 2:20] = True
        result = instances_to_results([Instance(mask, "cat")])
        tasks.append({"id": i + 1, "data": {"image": f"/data/local-files/?d={name}"},
                      "annotations": [{"id": i + 1, "result": result}]})  # fmt: skip
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    out = CliRunner().invoke(cli, ["export", str(export), "--yolo", str(tmp_path / "y"),
                                   "--labelme", str(tmp_path / "l")])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "already written for a.jpg" in " ".join(out.output.split())
    # The first image's files are intact: its region is rows 0-7, not the second's rows 10-17.
    line = (tmp_path / "y" / "labels" / "a.txt").read_text().split()
    ys = np.array(line[1:], float).reshape(-1, 2)[:, 1] * 30
    assert ys.max() <= 8.5
    shapes = json.loads((tmp_path / "l" / "a.json").read_text())["shapes"]
    assert max(p[1] for s in shapes for p in s["points"]) <= 8.5
