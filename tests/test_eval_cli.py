"""``ovss-label eval`` end to end on a Label Studio export (tiny models): every output, the
resume, the usage errors. The real-image runs on a VOC folder are in test_eval_voc.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ovss_label.cli import cli
from ovss_label.converters import Instance
from ovss_label.converters.labelstudio import instances_to_results

H, W = 48, 64


def _run(*argv: str):
    return CliRunner().invoke(cli, ["eval", *argv], catch_exceptions=False)


@pytest.fixture
def export(tmp_path):
    tasks = []
    for i in range(2):
        rgb = np.random.default_rng(i).integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(tmp_path / f"{i}.png")
        cat, dog = np.zeros((H, W), bool), np.zeros((H, W), bool)
        cat[5:30, 5:40], dog[30:45, 40:60] = True, True
        result = instances_to_results([Instance(cat, "cat"), Instance(dog, "dog")])
        tasks.append({"id": i + 1, "data": {"image": f"/data/local-files/?d={i}.png"},
                      "annotations": [{"id": 9 + i, "result": result}]})  # fmt: skip
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return path


def test_methods_on_an_export_write_every_output_and_a_rerun_reuses_the_predictions(export):
    out = export.parent
    argv = ["--ls-export", str(export), "--image-dir", str(out), "--method", "naclip,clip_sam",
            "--tiny", "--json", str(out / "r.json"), "--report", str(out / "charts"),
            "--save-predictions", str(out / "saved")]  # fmt: skip
    first = _run(*argv)
    assert first.exit_code == 0, first.output
    assert "mIoU" in first.output and "naclip" in first.output and "clip_sam" in first.output
    data = json.loads((out / "r.json").read_text())
    assert data["classes"] == ["background", "cat", "dog"] and data["images"] == 2
    for name in ("naclip", "clip_sam"):
        method = data["methods"][name]
        assert method["model_version"].startswith(name + "·") and "tiny" in method["model_version"]
        assert set(method) == {"model_version", "mIoU", "aAcc", "mAcc", "per_class", "images",
                               "failed"}  # fmt: skip
        assert set(method["per_class"]) == {"background", "cat", "dog"}
        assert 0.0 <= method["mIoU"] <= 1.0 and method["images"] == 2
        saved = out / "saved" / name
        assert sorted(p.name for p in saved.iterdir()) == ["0.png", "1.png", "predictions.json"]
    charts = sorted(p.name for p in (out / "charts").iterdir())
    assert charts == ["confusion_clip_sam.png", "confusion_naclip.png", "per_class_iou.png"]
    for chart in charts:
        with Image.open(out / "charts" / chart) as image:
            assert image.format == "PNG" and min(image.size) > 100

    before = {p: p.stat().st_mtime_ns for p in (out / "saved").rglob("*.png")}
    second = _run(*argv)
    assert second.exit_code == 0, second.output
    assert {p: p.stat().st_mtime_ns for p in (out / "saved").rglob("*.png")} == before
    assert json.loads((out / "r.json").read_text())["methods"] == data["methods"]


def test_saved_predictions_score_as_an_external_folder_with_the_same_numbers(export):
    out = export.parent
    common = ["--ls-export", str(export), "--image-dir", str(out)]
    _run(*common, "--method", "naclip", "--tiny", "--save-predictions", str(out / "s"),
         "--json", str(out / "a.json"))  # fmt: skip
    result = _run(
        *common, "--predictions", str(out / "s" / "naclip"), "--json", str(out / "b.json")
    )
    assert result.exit_code == 0, result.output
    a, b = (json.loads((out / n).read_text())["methods"]["naclip"] for n in ("a.json", "b.json"))
    assert a == b  # same numbers, and the manifest gives the same model_version


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give one ground truth"),
        (["--dataset", "voc", "--ls-export", "{export}"], "give one ground truth"),
        (["--dataset", "voc"], "--dataset needs --root"),
        (["--ls-export", "{export}"], "--ls-export needs --image-dir"),
        (["--ls-export", "{export}", "--image-dir", "{dir}"], "give --method and/or --predictions"),
        (["--method", "nope"], "unknown ['nope']"),
        (["--method", "naclip,naclip"], "named twice"),
        (["--agreement", "--coco", "{export}"], "--agreement reads --ls-export"),
        (["--dataset", "vocc", "--root", "{dir}", "--method", "naclip"], "Did you mean"),
    ],
)
def test_usage_errors_say_what_to_give(export, argv, message):
    argv = [a.format(export=export, dir=export.parent) for a in argv]
    result = _run(*argv)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_agreement_on_an_export_prints_writes_json_and_a_chart(tmp_path):
    cat = np.zeros((H, W), bool)
    cat[5:30, 5:40] = True
    edited = cat.copy()
    edited[5:10, 5:40] = False  # the annotator removed 175 of 875 pixels
    proposal = instances_to_results([Instance(cat, "cat")])
    tasks = [
        {"id": 1, "data": {"image": "a.png"},
         "predictions": [{"id": 7, "model_version": "naclip·b16·abc123", "result": proposal}],
         "annotations": [{"id": 1, "parent_prediction": 7, "result": proposal}]},
        {"id": 2, "data": {"image": "b.png"},
         "predictions": [{"id": 8, "model_version": "naclip·b16·abc123", "result": proposal}],
         "annotations": [{"id": 2, "parent_prediction": 8,
                          "result": instances_to_results([Instance(edited, "cat")])}]},
    ]  # fmt: skip
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    out = _run("--agreement", "--ls-export", str(export), "--json", str(tmp_path / "a.json"),
               "--report", str(tmp_path / "charts"))  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "naclip·b16·abc123" in out.output and "50.0%" in out.output  # 1 of 2 unchanged
    version = json.loads((tmp_path / "a.json").read_text())["versions"]["naclip·b16·abc123"]
    assert version["annotations"] == 2 and version["unchanged"] == 1
    assert version["per_class_iou"]["cat"] == pytest.approx((875 + 700) / (875 + 875))
    assert version["most_corrected"] == ["cat"]
    with Image.open(tmp_path / "charts" / "agreement.png") as chart:
        assert chart.format == "PNG"


def test_prediction_folders_with_one_name_are_told_apart_and_other_classes_refused(export):
    out = export.parent
    common = ["--ls-export", str(export), "--image-dir", str(out)]
    _run(*common, "--method", "naclip", "--tiny", "--save-predictions", str(out / "a"))
    _run(*common, "--method", "naclip", "--tiny", "--save-predictions", str(out / "b"))
    folders = [
        "--predictions",
        str(out / "a" / "naclip"),
        "--predictions",
        str(out / "b" / "naclip"),
    ]
    both = _run(*common, *folders, "--json", str(out / "r.json"))
    assert both.exit_code == 0, both.output
    methods = json.loads((out / "r.json").read_text())["methods"]
    assert sorted(methods) == ["naclip", "naclip-2"]
    assert methods["naclip"]["mIoU"] == methods["naclip-2"]["mIoU"]
    other = _run(*common, "--unlabeled", "ignore", "--predictions", str(out / "a" / "naclip"))
    assert other.exit_code != 0 and "predictions for other classes" in other.output
