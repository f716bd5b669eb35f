"""``eval --agreement``: annotations that started from a prediction against that prediction."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from ovss_label.backend.evaluation.agreement import (
    NO_VERSION,
    AgreementReport,
    PairAgreement,
    agreement,
    agreement_json,
)
from ovss_label.backend.evaluation.report import agreement_chart, agreement_table
from ovss_label.converters import Instance, instance_to_results, result_to_instance

H, W = 30, 40


def _box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[top:bottom, left:right] = True
    return mask


CAT = _box(5, 5, 15, 20)  # 150 px
DOG = _box(18, 22, 28, 36)  # 140 px
TREE = _box(2, 25, 12, 38)


def _brush(mask: np.ndarray, label: str) -> list[dict]:
    return instance_to_results(Instance(mask, label), "brush")


def _both(mask: np.ndarray, label: str) -> list[dict]:
    """Brush + polygon of one object, as ``predict --format both`` writes it."""
    return instance_to_results(Instance(mask, label), "both")


def _polygon(mask: np.ndarray, label: str) -> list[dict]:
    return instance_to_results(Instance(mask, label), "polygon")


CAR = {
    "id": "car1",
    "from_name": "bbox",
    "to_name": "image",
    "type": "rectanglelabels",
    "original_width": W,
    "original_height": H,
    "image_rotation": 0,
    "value": {
        "x": 5,
        "y": 60,
        "width": 50,
        "height": 30,
        "rotation": 0,
        "rectanglelabels": ["car"],
    },
}


def _cat_minus_ten() -> np.ndarray:
    """CAT with 10 pixels (one row's end) removed by the annotator."""
    edited = CAT.copy()
    edited[14, 10:20] = False
    return edited


def _prediction(ident: int, version: str | None, result: list[dict]) -> dict:
    return {"id": ident, "model_version": version, "result": result, "score": 0.5}


def _annotation(ident: int, parent: object, result: object, **extra: object) -> dict:
    record = {"id": ident, "result": result, "was_cancelled": False, "parent_prediction": parent}
    return {**record, "parent_annotation": None, "lead_time": 3.0, **extra}


def _export() -> list:
    pred_11 = _brush(CAT, "cat") + _both(DOG, "dog")
    pred_21 = [CAR, *_polygon(TREE, "tree")]
    pred_31 = _brush(CAT, "cat")
    undecodable = [{**_brush(CAT, "cat")[0], "id": "bad"}]
    undecodable[0]["value"] = {**undecodable[0]["value"], "rle": [1, 2, 3]}
    small = instance_to_results(Instance(np.ones((10, 20), bool), "cat"), "brush")
    rotated = [{**r, "image_rotation": 90} for r in _brush(CAT, "cat")]
    return [
        {  # v1: (a) unchanged, (b) cat edited, (e) cancelled, (f) no parent
            "id": 1,
            "data": {"image": "/data/upload/1/a.jpg"},
            "predictions": [_prediction(11, "v1", pred_11)],
            "annotations": [
                _annotation(101, 11, copy.deepcopy(pred_11)),
                _annotation(102, 11, _brush(_cat_minus_ten(), "cat") + _both(DOG, "dog")),
                _annotation(103, 11, [], was_cancelled=True),
                _annotation(104, None, _brush(CAT, "cat")),
            ],
        },
        {  # v1: (c) tree deleted, (g) parent not in the task
            "id": 2,
            "data": {"image": "/data/upload/1/b.jpg"},
            "predictions": [_prediction(21, "v1", pred_21)],
            "annotations": [
                _annotation(201, 21, [copy.deepcopy(CAR)]),
                _annotation(202, 999, []),
            ],
        },
        {  # v2: (d) dog added, (h) undecodable region, unchanged, another image size
            "id": 3,
            "data": {"image": "/data/upload/1/c.jpg"},
            "predictions": [_prediction(31, "v2", pred_31)],
            "annotations": [
                _annotation(301, 31, pred_31 + _brush(DOG, "dog")),
                _annotation(302, 31, undecodable),
                _annotation(303, 31, copy.deepcopy(pred_31)),
                _annotation(304, 31, small),
            ],
        },
        {  # no id: named by its position; a non-dict annotation
            "data": {"image": "/data/upload/1/d.jpg"},
            "predictions": [],
            "annotations": ["oops"],
        },
        42,  # not a task
        {  # v2: both records empty (unchanged, no IoU)
            "id": 6,
            "data": {"image": "/data/upload/1/e.jpg"},
            "predictions": [_prediction(61, "v2", [])],
            "annotations": [_annotation(601, 61, [])],
        },
        {  # a prediction that cannot be decoded: its annotations are skipped
            "id": 7,
            "data": {"image": "/data/upload/1/f.jpg"},
            "predictions": [_prediction(71, "v3", rotated)],
            "annotations": [_annotation(701, 71, _brush(CAT, "cat"))],
        },
    ]


@pytest.fixture(scope="module")
def report() -> AgreementReport:
    return agreement(_export())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def _pair(report: AgreementReport, annotation_id: int) -> PairAgreement:
    (pair,) = [p for p in report.pairs if p.annotation_id == annotation_id]
    return pair


def test_pairs_are_the_annotations_started_from_a_prediction(report: AgreementReport) -> None:
    assert [p.annotation_id for p in report.pairs] == [101, 102, 201, 301, 303, 601]
    assert report.without_parent == 1  # 104; the cancelled 103 is not counted
    assert report.missing_parent == 1  # 202
    assert [v.model_version for v in report.versions] == ["v1", "v2"]


def test_unchanged_pair_is_pixel_identical(report: AgreementReport) -> None:
    pair = _pair(report, 101)
    assert pair.unchanged and pair.mean_iou == 1.0
    assert pair.per_class == {"cat": (150, 150), "dog": (140, 140)}  # dog: brush + polygon, once
    assert (pair.task_id, pair.prediction_id, pair.model_version) == (1, 11, "v1")


def test_edited_class_iou_is_its_pixel_overlap(report: AgreementReport) -> None:
    pair = _pair(report, 102)
    edited = _cat_minus_ten()
    assert pair.per_class["cat"] == (np.count_nonzero(CAT & edited), np.count_nonzero(CAT | edited))
    assert pair.per_class["cat"] == (140, 150)
    assert pair.per_class["dog"] == (140, 140)
    assert not pair.unchanged
    assert pair.mean_iou == pytest.approx((_iou(CAT, edited) + 1.0) / 2)


def test_deleted_and_added_classes_have_nothing_in_common(report: AgreementReport) -> None:
    deleted = _pair(report, 201)
    tree = result_to_instance(_polygon(TREE, "tree")[0])
    car = result_to_instance(CAR)
    assert tree is not None and car is not None
    assert deleted.per_class == {"car": (car.area, car.area), "tree": (0, tree.area)}
    assert deleted.mean_iou == pytest.approx(0.5)
    added = _pair(report, 301)
    assert added.per_class == {"cat": (150, 150), "dog": (0, 140)}
    assert not added.unchanged


def test_two_empty_records_are_unchanged_without_iou(report: AgreementReport) -> None:
    pair = _pair(report, 601)
    assert pair.per_class == {} and pair.unchanged and pair.mean_iou is None


def test_unreadable_items_are_skipped_with_reasons(report: AgreementReport) -> None:
    reasons = dict(report.skipped)
    assert set(reasons) == {
        "task 3 annotation 302",
        "task 3 annotation 304",
        "task #4 in the file annotation #1",
        "task #5 in the file",
        "task 7 annotation 701",
    }
    assert reasons["task 3 annotation 302"].startswith("annotation region bad: undecodable brush")
    assert reasons["task 3 annotation 304"] == "annotation is 20x10, prediction is 40x30"
    assert reasons["task #5 in the file"] == "not a task object"
    assert reasons["task 7 annotation 701"].startswith("prediction 71 region")
    assert "image_rotation" in reasons["task 7 annotation 701"]


def test_version_summary(report: AgreementReport) -> None:
    v1, v2 = report.versions
    edited = _cat_minus_ten()
    assert (v1.annotations, v1.unchanged) == (3, 1)
    assert v1.unchanged_fraction == pytest.approx(1 / 3)
    cat = (150 + np.count_nonzero(CAT & edited)) / (150 + np.count_nonzero(CAT | edited))
    assert v1.per_class_iou == pytest.approx({"car": 1.0, "cat": cat, "dog": 1.0, "tree": 0.0})
    assert v1.corrected == {"car": 0, "cat": 1, "dog": 0, "tree": 1}
    assert v1.most_corrected == ["tree", "cat"]  # pooled IoU ascending
    assert v1.mean_iou == pytest.approx(np.mean([1.0, (_iou(CAT, edited) + 1) / 2, 0.5]))
    assert (v2.annotations, v2.unchanged) == (3, 2)  # 301 changed; 303 and 601 not
    assert v2.unchanged_fraction == pytest.approx(2 / 3)
    assert v2.per_class_iou == {"cat": 1.0, "dog": 0.0}
    assert v2.mean_iou == pytest.approx(0.75)  # 601 has no IoU
    assert v2.most_corrected == ["dog"]


def test_most_corrected_ties_go_to_the_more_often_corrected_and_stop_at_five() -> None:
    classes = [f"c{k}" for k in range(7)]
    masks = {name: _box(k, k, k + 3, k + 3) for k, name in enumerate(classes)}
    everything = [r for name in classes for r in _brush(masks[name], name)]
    tasks = [
        {  # every class deleted once; c6 deleted again below
            "id": 1,
            "predictions": [_prediction(1, "v", everything), _prediction(2, "v", [])],
            "annotations": [_annotation(10, 1, [])],
        },
        {
            "id": 2,
            "predictions": [_prediction(3, "v", _brush(masks["c6"], "c6"))],
            "annotations": [_annotation(20, 3, [])],
        },
    ]
    (version,) = agreement(tasks).versions
    assert set(version.per_class_iou.values()) == {0.0}
    assert version.corrected["c6"] == 2
    assert version.most_corrected == ["c6", "c0", "c1", "c2", "c3"]


def test_prediction_without_version() -> None:
    tasks = [{"id": 1, "predictions": [_prediction(1, None, [])], "annotations": []}]
    tasks[0]["annotations"] = [_annotation(2, 1, [])]
    assert agreement(tasks).pairs[0].model_version == NO_VERSION


def test_json(report: AgreementReport) -> None:
    data = json.loads(json.dumps(agreement_json(report)))
    assert set(data) == {"versions", "without_parent", "missing_parent", "skipped",
                         "prediction_ids_only"}  # fmt: skip
    assert data["prediction_ids_only"] == 0
    assert set(data["versions"]) == {"v1", "v2"}
    v1 = data["versions"]["v1"]
    assert set(v1) == {
        "annotations",
        "unchanged",
        "unchanged_fraction",
        "mean_iou",
        "per_class_iou",
        "corrected",
        "most_corrected",
    }
    assert v1["annotations"] == 3 and v1["unchanged"] == 1
    assert v1["unchanged_fraction"] == pytest.approx(1 / 3, abs=1e-6)
    assert v1["per_class_iou"]["cat"] == pytest.approx(290 / 300, abs=1e-6)
    assert v1["most_corrected"] == ["tree", "cat"]
    fractions = [v1["unchanged_fraction"], v1["mean_iou"], *v1["per_class_iou"].values()]
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert (data["without_parent"], data["missing_parent"]) == (1, 1)
    assert {"item": "task #5 in the file", "reason": "not a task object"} in data["skipped"]


def test_table_has_one_row_per_version(report: AgreementReport) -> None:
    table = agreement_table(report)
    assert table.row_count == 2
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "33.3%" in text and "66.7%" in text and "tree 0.0%" in text


@pytest.mark.parametrize("classes", [0, 4, 30])
def test_chart_is_a_png(tmp_path: Path, report: AgreementReport, classes: int) -> None:
    if classes == 0:
        report = agreement([])
    elif classes == 30:
        names = [f"a rather long class name {k}" for k in range(30)]
        results = [r for k, n in enumerate(names) for r in _brush(_box(k, 0, k + 1, 5), n)]
        tasks = [{"id": 1, "predictions": [_prediction(1, "v9", results)]}]
        tasks[0]["annotations"] = [_annotation(1, 1, results[:10])]
        report = agreement(tasks)
    path = tmp_path / "out" / "agreement.png"
    agreement_chart(report, path)
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    assert [p.name for p in path.parent.iterdir()] == ["agreement.png"]  # no temp file left


def test_malformed_records_are_skipped_not_raised() -> None:
    bad_value = [{**_brush(CAT, "cat")[0], "id": "v", "value": "not an object"}]
    tasks = [
        {
            "id": 1,
            "predictions": [_prediction(1, "v", _brush(CAT, "cat")), "x", {"model_version": "v"}],
            "annotations": [
                _annotation(2, 1, bad_value),
                _annotation(3, [1], []),  # not an id: counted as a missing parent
                _annotation(4, 1, "not a list"),
            ],
        },
        {"id": 2, "predictions": {"id": 1}, "annotations": None},
    ]
    report = agreement(tasks)
    assert report.pairs == [] and report.missing_parent == 1
    reasons = dict(report.skipped)
    assert reasons["task 1 annotation 2"] == "annotation region v: value is a str, not an object"
    assert reasons["task 1 annotation 4"] == "annotation result is not a list"
    assert reasons["task 1 prediction #2"] == reasons["task 1 prediction #3"]
    assert reasons["task 2"] == "predictions is not a list"


def test_an_export_listing_prediction_ids_only_is_counted_not_compared() -> None:
    # Label Studio's JSON export writes "predictions": [12] (ids), not the predictions.
    tasks = [{"id": 1, "predictions": [12, 13], "annotations": [_annotation(2, 12, [])]}]
    report = agreement(tasks)
    assert report.prediction_ids_only == 2 and report.pairs == [] and report.skipped == []
    assert report.missing_parent == 1
