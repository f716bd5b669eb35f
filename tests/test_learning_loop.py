"""The server's learning loop (backend/learning/loop.py): webhooks to trigger state and jobs,
ticks that queue due projects and run one job; the job runner is replaced by a fake here (the
real one is tested in test_learning_worker.py)."""

from __future__ import annotations

import pytest

from ovss_label.backend.learning import loop as loop_module
from ovss_label.backend.learning.loop import LearningLoop
from ovss_label.backend.learning.triggers import TriggerPolicy
from ovss_label.backend.learning.worker import WorkerSettings
from ovss_label.backend.store import events_path


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path, monkeypatch):
    clock = Clock()
    ran = []

    def fake_run_job(job, owner, jobs, versions, settings, client):
        ran.append(job.id)
        if job.inputs.get("trigger") == "boom":
            raise RuntimeError("out of memory")
        return jobs.finish(job.id, owner, "rejected", result={"miou": 0.1}, reason="rejected: x")

    monkeypatch.setattr(loop_module, "run_job", fake_run_job)
    settings = WorkerSettings(tmp_path, "http://ls", "key")
    policy = TriggerPolicy(min_new_annotations=3, debounce_seconds=10, max_wait_seconds=None)
    loop = LearningLoop(events_path(tmp_path), settings, policy, lambda: object(), clock=clock)
    return loop, clock, ran


def test_start_training_queues_one_job_at_once(setup):
    loop, _, _ = setup
    loop.on_webhook("START_TRAINING", 5, [])
    loop.on_webhook("START_TRAINING", 5, [])  # a second click: the same job
    jobs = loop.jobs.list(5)
    assert [(j.state.value, j.inputs) for j in jobs] == [("queued", {"trigger": "START_TRAINING"})]
    loop.on_webhook("START_TRAINING", None, [])  # no project: nothing
    assert len(loop.jobs.list()) == 1


def test_annotation_bursts_queue_one_job_after_a_quiet_time(setup):
    loop, clock, ran = setup
    for annotation in (1, 2, 2, 3):  # an edit of 2 counts once
        loop.on_webhook("ANNOTATION_UPDATED", 7, [annotation])
        clock.now += 2
    assert loop.tick() is None and loop.jobs.list(7) == []  # still within the debounce
    clock.now += 10
    done = loop.tick()
    assert done is not None and ran == [done.id] and done.state.value == "rejected"
    assert "3 new annotations" in done.inputs["trigger"]
    clock.now += 100
    assert loop.tick() is None  # counters reset when the job was queued
    again = LearningLoop(loop.database, loop.settings, loop.policy, lambda: object(), clock=clock)
    again.on_webhook("ANNOTATION_CREATED", 7, [8, 9, 10])  # a bulk event, persisted state
    clock.now += 11
    assert again.tick() is not None and len(again.jobs.list(7)) == 2


def test_a_job_that_raises_is_released_for_another_attempt(setup):
    loop, _, ran = setup
    job = loop.jobs.enqueue(9, inputs={"trigger": "boom"})
    done = loop.tick()
    assert done is not None and done.id == job.id and ran == [job.id]
    assert done.state.value == "queued" and done.attempts == 1
    assert "RuntimeError: out of memory" in done.reason


def test_a_replica_waits_while_another_trains(setup):
    """Two loops on one data directory (``serve --learn`` replicas): one job trains at a time
    by default, so a second project's job waits for the first's end."""
    loop, clock, ran = setup
    replica = LearningLoop(loop.database, loop.settings, loop.policy, lambda: object(),
                           lease_seconds=60, clock=clock)  # fmt: skip
    first = loop.jobs.enqueue(1)
    assert loop.jobs.claim(loop.owner, 60) is not None  # the other replica is training it
    second = loop.jobs.enqueue(2)
    assert replica.tick() is None and ran == []
    loop.jobs.finish(first.id, loop.owner, "done")
    done = replica.tick()
    assert done is not None and done.id == second.id and ran == [second.id]


def test_the_webhook_feeds_the_loop_and_answers_at_once(setup, tmp_path):
    from fastapi.testclient import TestClient

    from ovss_label.backend.server import Engine, ServerSettings, create_app

    loop, _, _ = setup
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path))
    engine.learning = loop
    client = TestClient(create_app(engine))
    project = {"id": 5, "title": "p"}
    answer = client.post("/webhook", json={"action": "START_TRAINING", "project": project})
    assert answer.status_code == 201
    assert [j.state.value for j in loop.jobs.list(5)] == ["queued"]
    for annotation in (1, 2):
        body = {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 6},
            "annotation": {"id": annotation},
        }
        assert client.post("/webhook", json=body).status_code == 201
    assert loop._state(6).new_annotations == (1, 2)
    assert [e["action"] for e in engine.events.all()][-1] == "ANNOTATION_CREATED"  # stored too


def test_learning_needs_label_studio(tmp_path):
    from ovss_label.backend.server import ServerSettings
    from ovss_label.backend.server.learning import learning_loop

    with pytest.raises(ValueError, match="--learn needs LABEL_STUDIO_URL"):
        learning_loop(ServerSettings(tiny=True, data_dir=tmp_path, learn=True))


def test_a_job_queued_from_another_process_resets_the_counted_annotations(setup):
    """``ovss-label train --project ID --queue``: one job, and the annotations counted before
    it do not queue a second one once the first has run."""
    from ovss_label.backend.learning.loop import queue_training

    loop, clock, ran = setup
    for annotation in (1, 2, 3):
        loop.on_webhook("ANNOTATION_CREATED", 7, [annotation])
    job, created = queue_training(loop.database, 7, "command line", clock=clock)
    assert created and job.inputs == {"trigger": "command line"} and job.state.value == "queued"
    again, created_again = queue_training(loop.database, 7, "command line", clock=clock)
    assert again.id == job.id and not created_again
    clock.now += 60
    assert loop.tick().id == job.id and ran == [job.id]
    clock.now += 60
    assert loop.tick() is None and len(loop.jobs.list(7)) == 1  # nothing new since
