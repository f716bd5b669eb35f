"""Ground truth from a Label Studio export and a COCO file; predictions from folders, saved
and resumed; the eval job's failure rules (backend/evaluation: sources, predictions, run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ovss_label.backend.evaluation.groundtruth import paint_instances
from ovss_label.backend.evaluation.predictions import (
    FolderPredictor,
    SavingPredictor,
    read_label_png,
    write_label_png,
)
from ovss_label.backend.evaluation.run import run_eval
from ovss_label.backend.evaluation.sources import coco_ground_truth, label_studio_ground_truth
from ovss_label.converters import CocoWriter, Instance
from ovss_label.converters.labelstudio import instances_to_results

H, W = 30, 40
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""


def _mask(y0, y1, x0, x1):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _task(tid, name, instances, *, cancelled_after=False, kind="brush"):
    result = instances_to_results(instances, kind)
    annotations = [{"id": tid * 10, "result": result, "was_cancelled": False,
                    "updated_at": "2026-01-01T00:00:00Z"}]  # fmt: skip
    if cancelled_after:  # a later but cancelled annotation must not be used
        annotations.append({"id": tid * 10 + 1, "result": [], "was_cancelled": True,
                            "updated_at": "2026-02-01T00:00:00Z"})  # fmt: skip
    return {"id": tid, "data": {"image": f"/data/local-files/?d=photos/{name}"},
            "annotations": annotations, "predictions": []}  # fmt: skip


def _write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


@pytest.fixture
def export(tmp_path):
    big, small = _mask(0, 20, 0, 30), _mask(5, 10, 5, 10)  # small lies on big
    tasks = [
        _task(1, "a.png", [Instance(big, "cat"), Instance(small, "dog")], cancelled_after=True),
        _task(
            2, "b.png", [Instance(_mask(0, 5, 0, 5), "dog"), Instance(_mask(20, 30, 0, 5), "horse")]
        ),
        {"id": 3, "data": {"image": "/data/local-files/?d=photos/c.png"}, "annotations": []},
    ]
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        _write_image(tmp_path / "images" / "photos" / name, i)
    return tasks, tmp_path / "images"


def test_label_studio_labels_paint_smaller_regions_on_top_and_ignore_the_rest(export):
    tasks, image_dir = export
    truth = label_studio_ground_truth(
        tasks, label_config=CONFIG, image_dir=image_dir, unlabeled="ignore"
    )
    assert truth.classes == ("cat", "dog")
    assert [s.id for s in truth.samples] == ["photos/a", "photos/b"]  # task 3: no annotation
    labels = truth.samples[0].load_truth()
    expected = np.full((H, W), 255, np.uint8)
    expected[0:20, 0:30] = 0
    expected[5:10, 5:10] = 1  # the dog lies on the cat: the smaller keeps its pixels
    np.testing.assert_array_equal(labels, expected)
    assert truth.samples[0].load_image().shape == (H, W, 3)
    truth.samples[1].load_truth()
    assert dict(truth.dropped) == {"horse": 1}  # not a class: dropped and counted
    assert truth.no_class == 255


def test_unlabeled_background_adds_a_background_class_the_methods_are_not_asked_for(export):
    tasks, image_dir = export
    truth = label_studio_ground_truth(tasks, label_config=CONFIG, image_dir=image_dir)
    assert truth.classes == ("background", "cat", "dog")  # the default
    assert truth.vocabulary.names == ("cat", "dog")
    labels = truth.samples[0].load_truth()
    assert labels[25, 35] == 0 and labels[0, 0] == 1 and labels[6, 6] == 2
    # A method's output in vocabulary indices, -1 = no class -> background.
    assignment = np.array([[-1, 0, 1]], np.int16)
    assert truth.to_labels(assignment).tolist() == [[0, 1, 2]]


def test_without_a_label_config_the_classes_are_the_labels_used_sorted(export):
    tasks, image_dir = export
    truth = label_studio_ground_truth(tasks, image_dir=image_dir, unlabeled="ignore")
    assert truth.classes == ("cat", "dog", "horse")


def test_an_undecodable_region_fails_its_task_only(export):
    tasks, image_dir = export
    tasks[1]["annotations"][0]["result"][0]["value"]["rle"] = [1, 2, 3]
    truth = label_studio_ground_truth(
        tasks, label_config=CONFIG, image_dir=image_dir, unlabeled="ignore"
    )
    report = run_eval(truth, [_TruthPredictor(truth)])
    assert report.done == 1
    assert [item for item, _ in report.failed] == ["photos/b"]
    assert "cannot be scored" in report.failed[0][1]


def test_coco_file_as_ground_truth(tmp_path):
    writer = CocoWriter(["cat", "dog"])
    image_id = writer.add_image("x.png", W, H)
    writer.add_instance(image_id, Instance(_mask(0, 10, 0, 10), "dog"))
    writer.add_instance(image_id, Instance(_mask(0, 30, 0, 40), "cat"))
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(writer.to_dict()))
    _write_image(tmp_path / "x.png")
    truth = coco_ground_truth(path, tmp_path)
    assert truth.classes == ("background", "cat", "dog")
    labels = truth.samples[0].load_truth()
    assert labels[0, 0] == 2 and labels[20, 20] == 1 and set(np.unique(labels)) == {1, 2}


def test_paint_instances_larger_first_and_checks_sizes():
    big = Instance(_mask(0, 30, 0, 40), "a")
    small = Instance(_mask(0, 2, 0, 2), "b")
    labels = paint_instances([small, big], {"a": 0, "b": 1}, H, W)
    assert labels[0, 0] == 1 and labels[10, 10] == 0
    with pytest.raises(ValueError, match="mask is 40x30, image is 4x3"):
        paint_instances([big], {"a": 0}, 3, 4)


class _TruthPredictor:
    """Predicts the ground truth itself (an oracle)."""

    name, model_version = "oracle", "oracle-1"

    def __init__(self, truth):
        self.truth = truth

    def needs_image(self, sample):
        return False

    def predict(self, sample, image):
        return sample.load_truth()


class _Flaky:
    """Fails on one image id; predicts class 0 everywhere elsewhere."""

    name, model_version = "flaky", "flaky-1"

    def needs_image(self, sample):
        return True

    def predict(self, sample, image):
        if sample.id == "photos/a":
            raise RuntimeError("out of memory")
        return np.zeros(image.shape[:2], np.uint8)


def test_a_failing_method_scores_nothing_on_that_image_and_the_others_still_run(export):
    tasks, image_dir = export
    truth = label_studio_ground_truth(
        tasks, label_config=CONFIG, image_dir=image_dir, unlabeled="ignore"
    )
    report = run_eval(truth, [_TruthPredictor(truth), _Flaky()])
    result = report.result
    assert report.failed == [("photos/a [flaky]", "out of memory")]
    assert result.methods["oracle"].matrix.scores().miou == 1.0
    flaky = result.methods["flaky"]
    assert (flaky.images, flaky.failed) == (2, 1)
    # photos/a counted as all-255 (a miss for its 600 + 25 labelled pixels), photos/b as cat
    # everywhere: the dog's 25 pixels are a miss, no cat pixel is labelled there.
    assert flaky.matrix.counts[:, 2].tolist() == [575, 25]  # "none" column
    assert flaky.matrix.scores().iou == (0.0, 0.0)


def test_an_unreadable_image_is_left_out_for_every_method(export):
    tasks, image_dir = export
    (image_dir / "photos" / "a.png").write_bytes(b"not a png")
    truth = label_studio_ground_truth(
        tasks, label_config=CONFIG, image_dir=image_dir, unlabeled="ignore"
    )
    report = run_eval(truth, [_TruthPredictor(truth), _Flaky()])
    assert report.done == 1 and [f[0] for f in report.failed] == ["photos/a"]
    assert report.result.methods["flaky"].images == 1


def test_prediction_folders_saved_resumed_and_guarded(export, tmp_path):
    tasks, image_dir = export
    truth = label_studio_ground_truth(
        tasks, label_config=CONFIG, image_dir=image_dir, unlabeled="ignore"
    )
    folder = tmp_path / "saved" / "flaky"
    saving = SavingPredictor(_Flaky(), folder, truth)
    run_eval(truth, [saving])
    assert not (folder / "photos" / "a.png").exists()  # the failure is not saved
    saved = read_label_png(folder / "photos" / "b.png")
    assert saved.dtype == np.uint8 and saved.shape == (H, W) and not saved.any()
    assert not saving.needs_image(truth.samples[1])  # a rerun reads the file
    manifest = json.loads((folder / "predictions.json").read_text())
    assert manifest["model_version"] == "flaky-1" and manifest["classes"] == ["cat", "dog"]

    class Other(_Flaky):
        model_version = "flaky-2"

    with pytest.raises(ValueError, match="another model version"):
        SavingPredictor(Other(), folder, truth)
    external = FolderPredictor(folder)  # the folder read as external predictions
    assert (external.name, external.model_version) == ("flaky", "flaky-1")
    report = run_eval(truth, [external])
    assert report.failed[0][0] == "photos/a [flaky]" and "no prediction file" in report.failed[0][1]


def test_prediction_files_must_be_single_channel_and_stay_in_their_folder(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="single-channel 8-bit PNG"):
        read_label_png(tmp_path / "rgb.png")
    write_label_png(tmp_path / "sub" / "x.png", np.array([[1, 255]], np.uint8))
    assert read_label_png(tmp_path / "sub" / "x.png").tolist() == [[1, 255]]
    from ovss_label.backend.evaluation.predictions import prediction_path

    with pytest.raises(ValueError, match="cannot name a file"):
        prediction_path(tmp_path, "../escape")


def test_an_annotation_with_no_region_is_all_background_at_the_image_size(export):
    tasks, _ = export
    tasks[2]["annotations"] = [{"id": 30, "result": []}]  # "nothing here", no size in results
    reads = []

    def fetch(url, task_id):
        reads.append(task_id)
        return np.zeros((H, W, 3), np.uint8)

    truth = label_studio_ground_truth(tasks, label_config=CONFIG, fetch=fetch)
    sample = truth.samples[2]
    assert sample.id == "photos/c"
    assert sample.load_truth().tolist() == np.zeros((H, W), np.uint8).tolist()
    assert sample.load_image().shape == (H, W, 3)
    assert reads == [3]  # read once: for its size, then kept for the methods
