"""Prediction scores (backend/proposers/confidence.py) and the reliability histogram they are
calibrated from (backend/evaluation/calibration.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_server import _predict_body, _task, server  # noqa: F401 - the fixture

from ovss_label.backend.evaluation.calibration import BINS, Reliability
from ovss_label.backend.proposers import Proposal
from ovss_label.backend.proposers.base import Proposer
from ovss_label.backend.proposers.confidence import (
    Calibration,
    fit_calibration,
    read_calibration,
    task_score,
)


def test_the_fit_pools_adjacent_violators_by_pixel_weight():
    # Bins 2 and 3 violate the order (0.4 then 0.3): pooled, weighted 10:30.
    fitted = fit_calibration([0.1, 0.3, 0.5, 0.7], [0.2, 0.4, 0.3, 0.9], [10, 10, 30, 10])
    assert fitted.knots == (0.1, 0.3, 0.5, 0.7)
    assert fitted.accuracy == pytest.approx((0.2, 0.325, 0.325, 0.9))
    assert fitted.pixels == 60
    # Between knots linear, beyond the ends constant.
    values = fitted(np.array([0.0, 0.2, 0.4, 0.6, 1.0]))
    assert values == pytest.approx([0.2, 0.2625, 0.325, 0.6125, 0.9])


def test_the_fit_leaves_empty_bins_out_and_needs_pixels():
    fitted = fit_calibration([0.1, float("nan"), 0.9], [0.5, float("nan"), 0.8], [5, 0, 5])
    assert fitted.knots == (0.1, 0.9) and fitted.accuracy == (0.5, 0.8)
    with pytest.raises(ValueError, match=r"^no labelled pixel to calibrate on$"):
        fit_calibration([0.5], [0.5], [0])


@pytest.mark.parametrize(
    "knots, accuracy, message",
    [((0.5, 0.4), (0.1, 0.2), "calibration knots must increase"),
     ((0.5, 0.5), (0.1, 0.2), "calibration knots must increase"),
     ((0.1, 0.2), (0.3, 0.2), "calibrated accuracies must not decrease"),
     ((0.1, 1.2), (0.1, 0.2), "calibration values must lie in [0, 1]"),
     ((0.1, 0.2), (-0.1, 0.2), "calibration values must lie in [0, 1]"),
     ((), (), "a calibration needs as many knots as accuracies, at least one"),
     ((0.1, 0.2), (0.3,), "a calibration needs as many knots as accuracies, at least one")],
)  # fmt: skip
def test_a_calibration_is_checked(knots, accuracy, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Calibration(knots, accuracy)
    Calibration((0.1, 0.2), (0.3, 0.3))  # equal accuracies are a flat stretch, allowed


def test_the_fit_averages_bins_of_equal_confidence_by_pixels():
    # Two bins at 0.5 (float ties of bin means): one knot, (0.2*10 + 0.6*30) / 40 = 0.5.
    fitted = fit_calibration([0.5, 0.7, 0.5], [0.6, 0.9, 0.2], [30, 10, 10])
    assert fitted.knots == (0.5, 0.7)
    assert fitted.accuracy == pytest.approx((0.5, 0.9))
    assert fitted.pixels == 50 and fitted.images == 0


def test_the_fit_keeps_single_pixel_bins_clips_rounding_and_counts_images():
    fitted = fit_calibration([0.2, 0.9], [-1e-12, 1.0 + 1e-12], [1, 1], images=3)
    assert fitted.knots == (0.2, 0.9)
    assert fitted.accuracy == (0.0, 1.0)  # rounding just outside [0, 1] is clipped
    assert (fitted.pixels, fitted.images) == (2, 3)
    with pytest.raises(ValueError):  # one pixel count short: refused, not silently truncated
        fit_calibration([0.2, 0.9], [0.5, 0.6], [1])


def test_a_calibration_read_back_needs_its_format_and_defaults_its_counts():
    data = {"format": "ovss-calibration/1", "knots": [0.1, 0.9], "accuracy": [0.2, 0.8]}
    assert Calibration.from_json(data) == Calibration((0.1, 0.9), (0.2, 0.8), 0, 0)
    for bad in ([data], "ovss-calibration/1", {**data, "format": "ovss-calibration/2"}):
        with pytest.raises(ValueError, match=r"^not a calibration \(ovss-calibration/1\)$"):
            Calibration.from_json(bad)


def test_a_calibration_file_round_trips_and_a_bad_one_is_named(tmp_path):
    made = fit_calibration([0.2, 0.6], [0.3, 0.7], [4, 6], images=2)
    (tmp_path / "calibration.json").write_text(json.dumps(made.to_json()))
    assert read_calibration(tmp_path) == made
    assert read_calibration(tmp_path / "elsewhere") is None
    (tmp_path / "calibration.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"calibration\.json"):
        read_calibration(tmp_path)


def test_the_histogram_counts_labelled_pixels_by_confidence():
    confidence = np.array([[0.04, 0.96], [0.5, 0.5], [1.0, 0.0]])
    truth = np.array([[0, 1], [255, 1], [2, 2]], np.uint8)
    prediction = np.array([[0, 0], [1, 1], [2, 255]], np.uint8)
    found = Reliability()
    found.update(confidence, truth, prediction)
    assert found.pixels.sum() == 5  # the 255 ground-truth pixel is not scored
    assert (found.pixels[0], found.correct[0]) == (2, 1)  # 0.04 right, 0.0 no prediction
    assert (found.pixels[10], found.correct[10]) == (1, 1)
    assert (found.pixels[BINS - 1], found.correct[BINS - 1]) == (2, 1)  # 0.96 wrong, 1.0 right
    # ECE by hand: bin 0 (acc 0.5, conf 0.02), bin 10 (1, 0.5), bin 19 (0.5, 0.98).
    expected = (2 * abs(0.5 - 0.02) + 1 * abs(1 - 0.5) + 2 * abs(0.5 - 0.98)) / 5
    assert found.ece() == pytest.approx(expected)
    assert Reliability.from_json(found.to_json()).to_json() == found.to_json()


def test_the_fitted_map_calibrates_unseen_pixels_of_an_over_confident_model():
    """Pixels right with probability conf² (an over-confident model): the map fitted on one
    sample brings the expected calibration error of another sample near zero."""
    rng = np.random.default_rng(0)

    def sample(n=200_000):
        confidence = rng.uniform(0, 1, (1, n))
        truth = np.zeros((1, n), np.uint8)
        prediction = (rng.uniform(0, 1, (1, n)) >= confidence**2).astype(np.uint8)
        return confidence, truth, prediction

    fitting, unseen = Reliability(), Reliability()
    fitting.update(*sample())
    confidence, truth, prediction = sample()
    unseen.update(confidence, truth, prediction)
    calibrated = Reliability()
    calibrated.update(fitting.fit()(confidence), truth, prediction)
    assert unseen.ece() > 0.15
    assert calibrated.ece() < 0.02


def _quarter(proposer, image, vocabulary, cache):
    """A proposal sure of the left quarter (0.9), unsure elsewhere (0.2)."""
    h, w = image.shape[:2]
    scores = np.full((len(vocabulary.names), h, w), 0.0, np.float32)
    scores[0][:, : w // 4], scores[1][:, w // 4 :] = 0.9, 0.2
    assignment = np.ones((h, w), np.int16)
    assignment[:, : w // 4] = 0
    return Proposal(tuple(vocabulary.names), scores, assignment)


def test_the_score_is_the_mean_pixel_confidence_not_the_mean_instance_score():
    proposal = _quarter(None, np.zeros((8, 8, 3), np.uint8), _Names(), None)
    assert task_score(proposal) == pytest.approx(0.25 * 0.9 + 0.75 * 0.2)  # not (0.9 + 0.2) / 2
    flat = Calibration((0.0, 1.0), (0.6, 0.6))
    assert task_score(proposal, flat) == pytest.approx(0.6)
    empty = Proposal(("cat",), np.zeros((1, 0, 4), np.float32))  # no pixel: a score of 0
    assert task_score(empty) == 0.0 and task_score(empty, flat) == 0.0
    confident = Proposal(proposal.labels, proposal.scores, proposal.assignment,
                         confidence=np.full((8, 8), 0.7, np.float32))  # fmt: skip
    assert task_score(confident) == pytest.approx(0.7)  # the method's own decision counts


class _Names:
    names = ("cat", "dog")


def test_predict_files_and_the_server_score_through_the_proposers_calibration(
    server,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    import ovss_label.backend.predict as job
    import ovss_label.backend.server.engine as engine_module

    monkeypatch.setattr(job, "propose", _quarter)
    monkeypatch.setattr(engine_module, "propose", _quarter)
    client, _ = server
    body = _predict_body([_task(1, "/data/local-files/?d=photos/a.png")])
    raw = client.post("/predict", json=body).json()["results"][0]["score"]
    assert raw == pytest.approx(round(0.25 * 0.9 + 0.75 * 0.2, 4))
    # A trained version's map (what a learning job writes beside the head): 0.2 -> 0.1, 0.9 -> 0.8.
    monkeypatch.setattr(Proposer, "calibration", Calibration((0.2, 0.9), (0.1, 0.8)))
    calibrated = client.post("/predict", json=body).json()["results"][0]["score"]
    assert calibrated == pytest.approx(round(0.25 * 0.8 + 0.75 * 0.1, 4))

    from ovss_label.backend.predict import predict_files
    from ovss_label.backend.proposers import create_proposer
    from ovss_label.converters import ResultTargets
    from ovss_label.ontologies import Vocabulary

    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(photo)
    tasks, _ = predict_files(create_proposer("naclip", tiny=True), Vocabulary.from_labels("a, b"),
                             [photo], output=ResultTargets(),
                             url_for=lambda p: p.name)  # fmt: skip
    assert tasks[0]["predictions"][0]["score"] == pytest.approx(calibrated)


def _zero_shot_map(data, project, version, histogram=((0.2, 0.1), (0.9, 0.8))):
    """What a training job saves for ``project``'s naclip (calibrations.py), from a histogram
    whose bins have these (confidence, accuracy) and 100 pixels each."""
    from ovss_label.backend.learning.calibrations import write_zero_shot

    return write_zero_shot(data, project, "naclip", version, _histogram(histogram), job=9)


def _histogram(bins):
    """A reliability histogram with ``bins`` of 100 pixels each."""
    pixels, right, confidence = np.zeros(BINS, np.int64), np.zeros(BINS), np.zeros(BINS)
    for c, a in bins:
        b = min(int(c * BINS), BINS - 1)
        pixels[b], right[b], confidence[b] = 100, 100 * a, 100 * c
    return Reliability(pixels, right.astype(np.int64), confidence)


def test_a_project_without_a_version_scores_through_its_zero_shot_map(
    server,  # noqa: F811
    monkeypatch,
    caplog,
):
    import ovss_label.backend.server.engine as engine_module

    monkeypatch.setattr(engine_module, "propose", _quarter)
    client, engine = server
    data = engine.settings.data_dir
    body = _predict_body([_task(1, "/data/local-files/?d=photos/a.png")])  # project 3

    def score(project="3.1763719200"):
        return client.post("/predict", json={**body, "project": project}).json()["results"][0]

    raw = round(0.25 * 0.9 + 0.75 * 0.2, 4)
    assert score()["score"] == pytest.approx(raw)
    version = engine.model_version("naclip")
    path = _zero_shot_map(data, 3, version)
    assert path == data / "calibration" / "3" / "naclip.json"
    first = score()
    assert first["score"] == pytest.approx(round(0.25 * 0.8 + 0.75 * 0.1, 4))
    assert first["model_version"] == version  # the score changes, the model does not
    assert score("4.1763719200")["score"] == pytest.approx(raw)  # another project: its own
    # Re-measured by a later job: the new map is read without a restart.
    _zero_shot_map(data, 3, version, histogram=((0.2, 0.3), (0.9, 0.6)))
    assert score()["score"] == pytest.approx(round(0.25 * 0.6 + 0.75 * 0.3, 4))
    # Measured on other weights: not this model's map, so raw.
    _zero_shot_map(data, 3, "naclip·other-weights")
    assert score()["score"] == pytest.approx(raw)
    # A damaged file is logged and ignored: the prediction stands, raw.
    path.write_text("{not json", encoding="utf-8")
    assert score()["score"] == pytest.approx(raw)
    assert "zero-shot calibration ignored" in caplog.text


def test_the_zero_shot_map_is_for_the_dense_method_and_a_plain_name():
    from ovss_label.backend.learning.calibrations import dense_method, zero_shot_path

    assert dense_method("naclip+sam") == "naclip" and dense_method("clip_sam") == "clip_sam"
    with pytest.raises(ValueError, match="not a dense method name"):
        zero_shot_path(Path("/data"), 3, "../../etc/passwd")


def test_uncertainty_sampling_sets_the_projects_sampling_and_version_and_needs_a_project():
    from types import SimpleNamespace

    from click.testing import CliRunner

    from ovss_label.cli import cli
    from ovss_label.lsapi import order_by_uncertainty

    calls = []
    client = SimpleNamespace(projects=SimpleNamespace(update=lambda **kw: calls.append(kw)))
    order_by_uncertainty(client, 7, "fmbseg·dL14·head·3f9c2a")
    assert calls == [{"id": 7, "sampling": "Uncertainty sampling",
                      "model_version": "fmbseg·dL14·head·3f9c2a"}]  # fmt: skip
    files = CliRunner().invoke(cli, ["predict", "x.png", "-o", "t.json", "--uncertainty-sampling"])
    assert files.exit_code == 2 and "--uncertainty-sampling is for --project" in files.output


def test_a_sam_refined_method_scores_through_its_dense_methods_zero_shot_map(server):  # noqa: F811
    """``naclip+sam``'s score is NACLIP's confidence, so it takes the map measured on NACLIP
    (saved under ``naclip`` with NACLIP's model version); a trained head never does."""
    from ovss_label.backend.proposers.refine import SamRefined

    _, engine = server
    _zero_shot_map(engine.settings.data_dir, 3, engine.model_version("naclip"))
    refined = engine.proposer("naclip+sam", None)
    assert isinstance(refined, SamRefined)
    expected = engine.calibration(engine.proposer("naclip", None), 3, None)
    assert expected is not None and engine.calibration(refined, 3, None) == expected
    assert engine.calibration(refined, 4, None) is None  # another project: none measured
    assert engine.calibration(refined, 3, "head-of-a-version") is None  # its own, none here
    # Without a version (the Ray driver, before any proposer is built): the planned one.
    assert engine.zero_shot_calibration(3, None, "naclip+sam") == expected
