"""mmseg's IoUMetric formula (backend/evaluation/metrics.py): hand-computed values, and an
independent oracle written the way mmseg 1.x's ``intersect_and_union`` is (torch.histc)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ovss_label.backend.evaluation.metrics import ConfusionMatrix, LabelMapError

T = 255


def _matrix(k: int, *pairs: tuple[list[list[int]], list[list[int]]]) -> ConfusionMatrix:
    matrix = ConfusionMatrix(k)
    for truth, prediction in pairs:
        matrix.update(np.array(truth, np.uint8), np.array(prediction, np.uint8))
    return matrix


def test_hand_computed_with_ignore_no_prediction_and_an_absent_class():
    # 5 scored pixels; (1, 2) is ignored (its prediction 2 must not count anywhere).
    truth = [[0, 0, 1], [1, 2, T]]
    prediction = [[0, 1, 1], [T, 2, 2]]
    scores = _matrix(4, (truth, prediction)).scores()
    # class 0: I 1, labelled 2, predicted 1 -> U 2; class 1: I 1, labelled 2, predicted 2
    # -> U 3; class 2: I 1, U 1; class 3 absent everywhere -> undefined, drops out.
    assert scores.iou == pytest.approx((1 / 2, 1 / 3, 1.0, None))
    assert scores.acc == pytest.approx((1 / 2, 1 / 2, 1.0, None))
    assert scores.miou == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    assert scores.macc == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert scores.aacc == pytest.approx(3 / 5)


def test_a_class_only_predicted_counts_with_iou_zero_and_sums_are_over_the_dataset():
    first = ([[0, 0, 1], [1, 2, T]], [[0, 1, 1], [T, 2, 2]])
    second = ([[2]], [[3]])  # class 3 predicted where it is not: IoU 0, counted in mIoU
    scores = _matrix(4, first, second).scores()
    # class 2 over both images: I 1, labelled 2, predicted 1 -> 1/2 (not the mean of 1 and 0)
    assert scores.iou == pytest.approx((1 / 2, 1 / 3, 1 / 2, 0.0))
    assert scores.acc[3] is None  # never labelled
    assert scores.miou == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 0) / 4)
    assert scores.aacc == pytest.approx(3 / 6)


def test_an_all_255_prediction_is_a_miss_for_every_labelled_pixel():
    scores = _matrix(2, ([[0, 1], [1, T]], [[T, T], [T, T]])).scores()
    assert scores.iou == (0.0, 0.0)
    assert scores.aacc == 0.0
    assert scores.miou == 0.0


def test_nothing_labelled_is_undefined_not_zero():
    scores = _matrix(3, ([[T, T]], [[0, 1]])).scores()
    assert scores.iou == (None, None, None)
    assert scores.miou is None and scores.aacc is None


def test_normalised_rows_sum_to_one_and_have_a_none_column():
    matrix = _matrix(2, ([[0, 0, 1, 1]], [[0, T, 0, 1]]))
    assert matrix.normalised().tolist() == [[0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]


def test_bad_maps_are_refused_with_what_is_wrong():
    matrix = ConfusionMatrix(3)
    with pytest.raises(LabelMapError, match=r"prediction holds values \[7\]"):
        matrix.update(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8))
    with pytest.raises(LabelMapError, match=r"ground truth holds values \[3\]"):
        matrix.update(np.full((2, 2), 3, np.uint8), np.zeros((2, 2), np.uint8))
    with pytest.raises(LabelMapError, match=r"prediction is 3x2, ground truth is 2x2"):
        matrix.update(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    assert matrix.counts.sum() == 0  # a refused image adds nothing
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(255)


def _mmseg_iou_metric(pairs, k, ignore_index=255):
    """mmseg 1.x ``IoUMetric.intersect_and_union`` + ``total_area_to_metrics`` (mIoU, mAcc,
    aAcc), as written there: per image histc of intersections, predictions and labels."""
    total = torch.zeros(4, k, dtype=torch.float64)
    for label, pred in pairs:
        label, pred = (
            torch.from_numpy(label.astype(np.int64)),
            torch.from_numpy(pred.astype(np.int64)),
        )
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        area_intersect = torch.histc(intersect.float(), bins=k, min=0, max=k - 1)
        area_pred = torch.histc(pred.float(), bins=k, min=0, max=k - 1)
        area_label = torch.histc(label.float(), bins=k, min=0, max=k - 1)
        area_union = area_pred + area_label - area_intersect
        total += torch.stack([area_intersect, area_union, area_pred, area_label]).double()
    inter, union, _, label = total
    iou, acc = inter / union, inter / label
    return np.nanmean(iou.numpy()), np.nanmean(acc.numpy()), float(inter.sum() / label.sum())


def test_equals_mmseg_on_random_maps_with_ignore_and_no_prediction():
    rng = np.random.default_rng(0)
    k = 7
    pairs = []
    for _ in range(5):
        truth = rng.integers(0, k - 1, (31, 47)).astype(np.uint8)  # class 6 never labelled
        truth[rng.random(truth.shape) < 0.1] = T
        prediction = rng.integers(0, k, (31, 47)).astype(np.uint8)
        prediction[rng.random(truth.shape) < 0.1] = T
        pairs.append((truth, prediction))
    matrix = ConfusionMatrix(k)
    for truth, prediction in pairs:
        matrix.update(truth, prediction)
    scores = matrix.scores()
    miou, macc, aacc = _mmseg_iou_metric(pairs, k)
    assert scores.miou == pytest.approx(miou, abs=1e-12)
    assert scores.macc == pytest.approx(macc, abs=1e-12)
    assert scores.aacc == pytest.approx(aacc, abs=1e-12)
