"""Gated promotion (backend/learning/gate.py) on hand-made confusion matrices, and the sticky
held-out split it is scored on (backend/learning/split.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ovss_label.backend.evaluation.metrics import ConfusionMatrix
from ovss_label.backend.learning.gate import GateConfig, HeldOutScores, decide
from ovss_label.backend.learning.split import held_out, position, split_tasks

CLASSES = ("background", "dog", "cat")
LABELLED = (50_000, 20_000, 500)  # cat: below min_class_pixels (1000), poorly supported


def _version(ious: tuple[float, ...], labelled: tuple[int, ...] = LABELLED) -> ConfusionMatrix:
    """Per class, ``iou`` of its labelled pixels predicted right and the rest predicted "no
    class": then predicted = intersection, union = labelled, and IoU is exactly ``iou``."""
    k = len(labelled)
    matrix = ConfusionMatrix(k)
    for c, (n, iou) in enumerate(zip(labelled, ious, strict=True)):
        matrix.counts[c, c] = round(n * iou)
        matrix.counts[c, k] = n - round(n * iou)
    return matrix


ACTIVE = _version((0.8, 0.6, 0.5))  # mIoU 0.633
ZERO_SHOT = _version((0.7, 0.4, 0.3))  # mIoU 0.467


def _decide(candidate, active=ACTIVE, zero_shot=ZERO_SHOT, tasks=10, config=None):
    return decide(candidate, active, zero_shot, tasks, config, classes=CLASSES)


def test_too_few_held_out_tasks_rejects_even_a_better_candidate():
    decision = _decide(_version((0.9, 0.9, 0.9)), tasks=3)
    assert not decision.promote
    assert decision.reason == "rejected: 3 held-out tasks, need 5"
    assert decision.metrics["held_out_tasks"] == 3  # the metrics are recorded all the same
    assert decision.metrics["miou"]["candidate"] == pytest.approx(0.9)


def test_within_margin_rejects():
    decision = _decide(_version((0.8, 0.615, 0.5)))  # +0.005
    assert not decision.promote
    assert decision.reason == "rejected: mIoU 0.638 vs active 0.633 (+0.005 < margin 0.010)"


def test_beating_the_margin_promotes():
    decision = _decide(_version((0.85, 0.65, 0.5)))
    assert decision.promote
    assert decision.reason == "promoted: mIoU 0.667 vs active 0.633 (+0.033)"
    assert decision.metrics["baseline"] == "active"
    assert decision.metrics["delta"]["active"] == pytest.approx(0.1 / 3)


def test_exactly_the_margin_promotes_despite_floating_point():
    labelled = (100_000,)
    assert 0.41 - 0.40 < 0.01  # the case the tolerance is for
    decision = decide(_version((0.41,), labelled), _version((0.40,), labelled), None, 10)
    assert decision.promote, decision.reason


def test_a_well_supported_class_dropping_too_much_rejects():
    decision = _decide(_version((0.95, 0.52, 0.6)))  # mean +0.057, dog -0.080
    assert not decision.promote
    assert decision.reason == (
        "rejected: class 'dog' dropped 0.080 (> 0.050) with 20,000 labelled pixels"
    )
    rows = decision.metrics["well_supported_classes"]
    assert [r["class"] for r in rows] == ["dog", "background"]  # largest drop first; no cat
    assert rows[0]["drop"] == pytest.approx(0.08)


def test_the_worst_of_several_drops_is_named():
    config = GateConfig(margin=-1.0)  # let the class check decide
    decision = _decide(_version((0.7, 0.52, 0.5)), config=config)
    assert decision.reason == (
        "rejected: class 'background' dropped 0.100 (> 0.050) with 50,000 labelled pixels "
        "(and 1 more class)"
    )


def test_a_drop_at_the_limit_passes():
    decision = _decide(_version((0.95, 0.55, 0.5)))  # dog -0.050 exactly
    assert decision.promote, decision.reason


def test_a_poorly_supported_class_drop_is_ignored():
    decision = _decide(_version((0.95, 0.8, 0.3)))  # +0.050, but cat -0.200 on 500 pixels
    assert decision.promote, decision.reason
    assert "cat" not in [r["class"] for r in decision.metrics["well_supported_classes"]]


def test_min_class_pixels_decides_what_is_well_supported():
    config = GateConfig(min_class_pixels=100)
    decision = _decide(_version((0.95, 0.8, 0.3)), config=config)
    assert decision.reason.startswith("rejected: class 'cat' dropped 0.200 (> 0.050) with 500")


def test_no_active_version_compares_with_zero_shot():
    decision = _decide(_version((0.8, 0.6, 0.5)), active=None)
    assert decision.promote
    assert decision.reason == "promoted: mIoU 0.633 vs zero-shot 0.467 (+0.167)"
    assert decision.metrics["baseline"] == "zero_shot"
    assert decision.metrics["miou"]["active"] is None
    assert decision.metrics["delta"] == {"active": None, "zero_shot": pytest.approx(0.5 / 3)}


def test_a_first_version_worse_than_zero_shot_is_rejected():
    decision = _decide(_version((0.6, 0.3, 0.3)), active=None)
    assert not decision.promote
    assert decision.reason == "rejected: mIoU 0.400 vs zero-shot 0.467 (-0.067 < margin 0.010)"


def test_with_an_active_version_it_is_the_baseline_even_below_zero_shot():
    weak_active = _version((0.5, 0.3, 0.3))
    decision = _decide(_version((0.6, 0.35, 0.3)), active=weak_active)
    assert decision.promote
    assert decision.metrics["baseline"] == "active"
    assert decision.metrics["delta"]["zero_shot"] < 0  # reported, not gating


def test_no_baseline_at_all():
    candidate = _version((0.6, 0.3, 0.3))
    rejected = _decide(candidate, active=None, zero_shot=None)
    assert rejected.reason == "rejected: no active version and no zero-shot scores to compare with"
    config = GateConfig(compare_zero_shot=False)
    first = _decide(candidate, active=None, zero_shot=ZERO_SHOT, config=config)
    assert first.promote
    assert first.reason == "promoted: first version, mIoU 0.400 (compare_zero_shot is off)"
    assert first.metrics["baseline"] is None
    assert all(r["drop"] is None for r in first.metrics["well_supported_classes"])


def test_no_labelled_pixels_rejects():
    empty = (0, 0, 0)
    decision = _decide(_version((0, 0, 0), empty), _version((0, 0, 0), empty), None)
    assert decision.reason == "rejected: the 10 held-out tasks hold no labelled pixels"


def test_a_class_labelled_nowhere_counts_in_miou_only():
    # cat is labelled nowhere; the candidate predicts it on 1000 dog pixels (IoU 0), the
    # active version never predicts it (IoU None): explicit, no crash, no class drop.
    candidate, active = ConfusionMatrix(3), ConfusionMatrix(3)
    candidate.counts[:] = [[50_000, 0, 0, 0], [0, 19_000, 1000, 0], [0, 0, 0, 0]]
    active.counts[:] = [[40_000, 0, 0, 10_000], [0, 12_000, 0, 8000], [0, 0, 0, 0]]
    decision = _decide(candidate, active=active, zero_shot=None)
    assert candidate.scores().iou[2] == 0.0 and active.scores().iou[2] is None
    assert decision.metrics["miou"]["candidate"] == pytest.approx((1 + 0.95 + 0) / 3)
    assert decision.metrics["miou"]["active"] == pytest.approx((0.8 + 0.6) / 2)
    assert [r["class"] for r in decision.metrics["well_supported_classes"]] == ["background", "dog"]
    # The false positive class costs the candidate its lead in the mean.
    assert decision.reason == "rejected: mIoU 0.650 vs active 0.700 (-0.050 < margin 0.010)"


def test_scores_and_pixel_counts_are_accepted_as_well_as_matrices():
    candidate = _version((0.85, 0.65, 0.5))
    from_scores = _decide(HeldOutScores(candidate.scores(), LABELLED), HeldOutScores.of(ACTIVE))
    assert from_scores == _decide(candidate)


def test_versions_scored_on_different_tasks_are_refused():
    other = _version((0.8, 0.6, 0.5), (50_000, 20_001, 500))
    with pytest.raises(ValueError, match="same held-out tasks"):
        _decide(_version((0.9, 0.9, 0.9)), active=other)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        decide(ACTIVE, None, ZERO_SHOT, 10, classes=("a", "b"))


def test_the_metrics_round_trip_through_json():
    for decision in (
        _decide(_version((0.95, 0.52, 0.6))),
        _decide(_version((0.85, 0.65, 0.5)), active=None),
        _decide(_version((0.9, 0.9, 0.9)), tasks=1),
    ):
        assert json.loads(json.dumps(decision.metrics)) == decision.metrics
        assert decision.metrics["config"] == {
            "min_held_out": 5,
            "margin": 0.01,
            "max_class_drop": 0.05,
            "min_class_pixels": 1000,
            "compare_zero_shot": True,
        }


# -- the sticky split ---------------------------------------------------------------------


def test_a_tasks_side_never_changes_when_tasks_are_added_or_removed():
    first_train, first_held = split_tasks(list(range(1, 201)))
    later_train, later_held = split_tasks(list(range(51, 401)))
    assert first_held and later_held
    for task in range(51, 201):
        assert (task in first_held) == (task in later_held) == held_out(task)
    assert set(first_train) | set(first_held) == set(range(1, 201))
    assert set(later_train) | set(later_held) == set(range(51, 401))


def test_the_fraction_is_roughly_respected():
    for fraction in (0.1, 0.2, 0.5):
        _, held = split_tasks(list(range(1000)), fraction)
        assert abs(len(held) - 1000 * fraction) < 40, (fraction, len(held))


def test_at_least_one_task_on_each_side():
    low = [t for t in range(100) if position(t) >= 0.2][:2]  # the rule holds neither out
    train, held = split_tasks(low)
    assert held == [min(low, key=position)] and len(train) == 1
    for n in range(2, 30):
        train, held = split_tasks(list(range(n)))
        assert train and held, n
    assert split_tasks([7]) == ([7], [])
    assert split_tasks([4, 5, 6], fraction=0.0) == ([4, 5, 6], [])
    assert split_tasks([4, 5], fraction=1.0) == ([4], [5])  # 4 has the larger position


def test_ids_are_deduplicated_and_salt_matters():
    assert split_tasks([3, 3, 4, 4]) == split_tasks([3, 4])
    assert position(12) != position(12, salt="")


def test_without_a_salt_it_is_the_training_split_rule():
    from ovss_label.backend.training.data import TrainItem, split_items

    items = tuple(TrainItem(f"task-{i}", "k", (1, 1), (1, 1)) for i in range(60))
    train, held = split_items(items, 0.2)
    ids_train, ids_held = split_tasks([i.id for i in items], 0.2, salt="")
    # The same sides (split_items lists its held-out items by position, split_tasks in input
    # order).
    assert [i.id for i in train] == ids_train
    assert sorted(i.id for i in held) == sorted(ids_held)
    assert [i.id for i in split_items(items[:2], 0.2)[1]] == split_tasks(
        [i.id for i in items[:2]], 0.2, salt=""
    )[1]
    assert np.isclose(len(ids_held) / 60, 0.2, atol=0.1)
