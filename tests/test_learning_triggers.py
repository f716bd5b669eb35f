"""Training triggers (backend/learning/triggers.py) on a fake clock: the debounce, the count,
START_TRAINING, the reset after queueing, and the nightly schedule."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime, timezone

import pytest

from ovss_label.backend.learning.triggers import (
    TriggerPolicy,
    TriggerState,
    after_queued,
    due,
    on_event,
    parse_schedule,
)

CREATED, UPDATED, DELETED = "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc).timestamp()  # a Friday, noon UTC
HOUR = 3600.0


class Project:
    """One project's trigger loop as the server runs it: events in, ``due`` polled every
    ``step`` seconds, a job queued (``after_queued``) whenever one is due."""

    def __init__(self, policy: TriggerPolicy, step: float = 1.0) -> None:
        self.policy, self.step = policy, step
        self.state = TriggerState()
        self.now = T0
        self.jobs: list[tuple[float, str]] = []

    def event(self, kind: str, annotation_id: int | None) -> None:
        self.state = on_event(self.state, kind, annotation_id, self.now)

    def run_until(self, end: float, events: Iterable[tuple[float, str, int | None]] = ()) -> None:
        """Advances the clock to ``end``, delivering ``(time, kind, id)`` events on the way."""
        pending = sorted(events, key=lambda e: e[0])
        while self.now <= end:
            while pending and pending[0][0] <= self.now:
                _, kind, annotation_id = pending.pop(0)
                self.event(kind, annotation_id)
            reason = due(self.state, self.now, self.policy)
            if reason:
                self.jobs.append((self.now - T0, reason))
                self.state = after_queued(self.state, self.now)
            self.now += self.step


def _burst(start: float, ids: Iterable[int], every: float, kind: str = CREATED):
    return [(T0 + start + i * every, kind, a) for i, a in enumerate(ids)]


def test_a_burst_gives_one_job_after_the_quiet_time():
    project = Project(TriggerPolicy())
    events = _burst(0, range(1, 16), every=4)  # 15 events over 60 s (the last at 56 s)
    project.run_until(T0 + 3 * HOUR, events)
    assert project.jobs == [(176.0, "15 new annotations, quiet for 120 s")]


def test_fewer_than_n_never_trigger():
    project = Project(TriggerPolicy(min_new_annotations=10), step=10)
    project.run_until(T0 + 48 * HOUR, _burst(0, range(1, 10), every=30))
    assert project.jobs == []
    assert len(project.state.new_annotations) == 9  # still waiting for the tenth


def test_edits_of_one_annotation_count_once_and_deletes_do_not_add():
    project = Project(TriggerPolicy(), step=10)
    events = _burst(0, [1, 2, 3] * 5, every=2, kind=UPDATED)
    events += _burst(40, range(100, 110), every=2, kind=DELETED)
    project.run_until(T0 + HOUR, events)
    assert project.jobs == []
    assert project.state.new_annotations == (1, 2, 3)


def test_a_deleted_new_annotation_is_no_longer_new():
    state = TriggerState()
    for annotation_id in (1, 2):
        state = on_event(state, CREATED, annotation_id, T0)
    state = on_event(state, DELETED, 1, T0 + 5)
    assert state.new_annotations == (2,)
    assert state.first_new_at == T0
    state = on_event(state, DELETED, 2, T0 + 6)
    assert state.new_annotations == () and state.first_new_at is None


def test_start_training_is_due_at_once():
    state = on_event(TriggerState(), "START_TRAINING", None, T0)
    assert due(state, T0, TriggerPolicy()) == "START_TRAINING"
    assert due(after_queued(state, T0), T0, TriggerPolicy()) is None


def test_start_training_wins_over_a_pending_count():
    state = TriggerState()
    for annotation_id in range(12):
        state = on_event(state, CREATED, annotation_id, T0)
    state = on_event(state, "START_TRAINING", None, T0 + 1)
    assert due(state, T0 + 1, TriggerPolicy()) == "START_TRAINING"


def test_after_queued_resets_to_the_snapshot_point():
    project = Project(TriggerPolicy())
    events = _burst(0, range(1, 13), every=1)
    events += _burst(600, range(13, 18), every=1)  # 5 more after the job: not enough
    project.run_until(T0 + HOUR, events)
    assert project.jobs == [(131.0, "12 new annotations, quiet for 120 s")]
    assert project.state.new_annotations == (13, 14, 15, 16, 17)
    assert project.state.queued_at == T0 + 131
    fresh = after_queued(project.state, T0 + HOUR)
    assert fresh == TriggerState(queued_at=T0 + HOUR)


def test_steady_edits_still_trigger_after_the_longest_wait():
    project = Project(TriggerPolicy(), step=10)
    events = _burst(0, range(1, 200), every=60)  # never quiet for 120 s
    project.run_until(T0 + 2 * HOUR, events)
    assert project.jobs[0] == (1800.0, "31 new annotations over 1800 s, still arriving")
    off = Project(TriggerPolicy(max_wait_seconds=None), step=10)
    off.run_until(T0 + 2 * HOUR, events)
    assert off.jobs == []


def test_nightly_schedule_is_due_once_a_night_only_with_new_annotations():
    policy = TriggerPolicy(min_new_annotations=None, schedule="nightly at 02:00")
    project = Project(policy, step=300)
    events = [
        (T0 + 2 * HOUR, CREATED, 1),  # Friday 14:00: three annotations
        (T0 + 2 * HOUR, CREATED, 2),
        (T0 + 3 * HOUR, UPDATED, 3),
        (T0 + 22 * HOUR, CREATED, 4),  # Saturday 10:00, after that night's job
        # Sunday: nothing new, so no job on Monday night
    ]
    project.run_until(T0 + 4 * 24 * HOUR, events)
    assert project.jobs == [
        (14 * HOUR, "nightly schedule: 3 new annotations"),  # Saturday 02:00
        (38 * HOUR, "nightly schedule: 1 new annotation"),  # Sunday 02:00
    ]


def test_the_schedule_follows_its_time_zone():
    policy = TriggerPolicy(schedule="nightly at 02:00", timezone="Europe/Paris")
    state = on_event(TriggerState(), CREATED, 1, T0)
    paris_2am = datetime(2024, 3, 2, 1, 0, tzinfo=timezone.utc).timestamp()  # UTC+1 in March
    assert due(state, paris_2am - 60, policy) is None
    assert due(state, paris_2am, policy) == "nightly schedule: 1 new annotation"


def test_schedule_and_policy_are_checked():
    assert parse_schedule(" Nightly at 2:05 ").isoformat() == "02:05:00"
    assert parse_schedule(None) is None
    for bad in ("weekly at 02:00", "nightly at 24:00", "nightly at 02:60", "nightly"):
        with pytest.raises(ValueError, match="nightly at HH:MM"):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="nightly at HH:MM"):
        TriggerPolicy(schedule="every night")
    with pytest.raises(ValueError, match="time zone"):
        TriggerPolicy(timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="min_new_annotations"):
        TriggerPolicy(min_new_annotations=0)


def test_other_actions_are_ignored():
    state = on_event(TriggerState(), CREATED, 1, T0)
    assert on_event(state, "PROJECT_UPDATED", 2, T0 + 1) == state


def test_state_and_policy_round_trip_through_json():
    state = TriggerState()
    for annotation_id in (5, 3, 9):
        state = on_event(state, CREATED, annotation_id, T0 + annotation_id)
    state = on_event(state, "START_TRAINING", None, T0 + 10)
    text = json.dumps(asdict(state))
    assert TriggerState.from_dict(json.loads(text)) == state
    assert TriggerState.from_dict({}) == TriggerState()
    policy = TriggerPolicy(schedule="nightly at 03:30", timezone="Europe/Paris")
    assert TriggerPolicy(**json.loads(json.dumps(asdict(policy)))) == policy
