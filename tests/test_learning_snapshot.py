"""Annotation snapshots: accepted annotations only, a stable digest, immutable files, the sticky
split, and what the trigger counts as new."""

from __future__ import annotations

import copy
import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest

from ovss_label.backend.evaluation.sources import label_studio_ground_truth
from ovss_label.backend.learning.snapshot import (
    Snapshot,
    new_annotations_since,
    pull_snapshot,
    read_snapshot,
    take_snapshot,
    tasks_of,
    write_snapshot,
)
from ovss_label.backend.learning.split import split_tasks
from ovss_label.converters import Instance
from ovss_label.converters.labelstudio import instances_to_results

H, W = 20, 30
NOW = 1_760_000_000.0
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
</View>"""


def _result(label="cat"):
    mask = np.zeros((H, W), bool)
    mask[2:10, 3:12] = True
    return instances_to_results([Instance(mask, label)], "brush")


def _annotation(aid, result, updated, *, cancelled=False):
    return {"id": aid, "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": updated,
            "completed_by": 1, "draft_created_at": None}  # fmt: skip


def _task(tid, annotations, predictions=()):
    return {"id": tid, "data": {"image": f"/data/local-files/?d=photos/{tid}.png"},
            "meta": {"original_width": W, "original_height": H}, "annotations": annotations,
            "predictions": list(predictions), "drafts": [{"id": 1, "result": _result("dog")}],
            "total_annotations": len(annotations)}  # fmt: skip


@pytest.fixture
def export():
    prediction = {"id": 77, "result": _result("dog"), "score": 0.9, "model_version": "m1"}
    accepted = _annotation(20, _result(), "2026-01-02T00:00:00Z")
    cancelled = _annotation(21, [], "2026-01-05T00:00:00Z", cancelled=True)  # later, cancelled
    older = _annotation(50, _result("dog"), "2026-01-01T00:00:00Z")
    return [
        _task(1, [_annotation(10, _result(), "2026-01-02T00:00:00Z")], [prediction]),
        _task(2, [accepted, cancelled]),
        _task(3, [], [prediction]),  # no annotation: left out, its prediction unread
        _task(4, [_annotation(40, [], "2026-01-03T00:00:00Z")]),  # "nothing here"
        _task(5, [older, _annotation(51, _result("cat"), "2026-01-04T00:00:00Z")]),
    ]


def _snap(tasks, **kw):
    kw.setdefault("now", NOW)
    return take_snapshot(tasks, CONFIG, 7, **kw)


def test_a_snapshot_keeps_the_accepted_annotation_of_each_task_and_nothing_else(export):
    snap = _snap(export)
    assert isinstance(snap, Snapshot) and snap.project == 7 and snap.created_at == NOW
    assert snap.entries == (
        (1, 10, "2026-01-02T00:00:00Z"),
        (2, 20, "2026-01-02T00:00:00Z"),  # not the later, cancelled 21
        (4, 40, "2026-01-03T00:00:00Z"),  # an empty result is a label
        (5, 51, "2026-01-04T00:00:00Z"),  # the latest of two
    )
    for task in snap.tasks:
        assert set(task) == {"id", "data", "meta", "annotations"}  # no predictions, drafts
        (annotation,) = task["annotations"]
        assert set(annotation) == {"id", "result", "updated_at", "created_at"}
    assert snap.tasks[2]["annotations"][0]["result"] == []
    assert snap.tasks[0]["annotations"][0]["result"] == export[0]["annotations"][0]["result"]
    assert snap.fraction == 0.2 and len(snap.digest) == 64
    assert sorted(snap.train + snap.held_out) == [1, 2, 4, 5]


def test_the_digest_ignores_export_order_and_predictions(export):
    digest = _snap(export).digest
    shuffled = copy.deepcopy(export)
    random.Random(0).shuffle(shuffled)
    for task in shuffled:
        task["annotations"].reverse()
        task["predictions"] = [{"id": 99, "result": [], "score": 0.1}] if task["id"] == 2 else []
    assert _snap(shuffled).digest == digest
    assert _snap(shuffled, now=NOW + 3600).digest == digest  # when it was taken is not data


def test_the_digest_changes_with_an_edit_or_another_config(export):
    digest = _snap(export).digest
    edited = copy.deepcopy(export)
    edited[0]["annotations"][0]["updated_at"] = "2026-01-09T00:00:00Z"
    assert _snap(edited).digest != digest
    assert take_snapshot(export, CONFIG + " ", 7, now=NOW).digest != digest
    assert _snap(export, fraction=0.5).digest != digest


def test_write_is_atomic_immutable_and_idempotent(export, tmp_path):
    snap = _snap(export)
    path = write_snapshot(snap, tmp_path / "snaps")
    assert path == tmp_path / "snaps" / f"{snap.digest[:16]}.json"
    assert read_snapshot(path) == snap
    first = path.read_bytes()
    later = _snap(list(reversed(export)), now=NOW + 60)  # same data, taken later
    assert write_snapshot(later, tmp_path / "snaps") == path
    assert path.read_bytes() == first  # left alone: keeps its created_at
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    assert not os.access(path, os.W_OK) or os.geteuid() == 0  # read-only (root ignores it)
    other = _snap(export[:2])
    os.replace(path, path.parent / f"{other.digest[:16]}.json")  # another snapshot claims it
    with pytest.raises(ValueError, match="another snapshot"):
        write_snapshot(other, tmp_path / "snaps")


def test_a_tampered_or_truncated_file_is_refused_and_never_overwritten(export, tmp_path):
    snap = _snap(export)
    path = write_snapshot(snap, tmp_path)
    body = json.loads(path.read_text())
    bad = tmp_path / "bad.json"
    for change in (
        lambda b: b["tasks"][0]["annotations"][0]["result"].clear(),
        lambda b: b["held_out"].append(99),
        lambda b: b.update(digest="0" * 64),
    ):
        tampered = copy.deepcopy(body)
        change(tampered)
        bad.write_text(json.dumps(tampered))
        with pytest.raises(ValueError, match=r"bad\.json"):
            read_snapshot(bad)
    bad.write_text(path.read_text()[:200])
    with pytest.raises(ValueError, match=r"bad\.json.*truncated"):
        read_snapshot(bad)
    path.chmod(0o644)
    path.write_text(path.read_text()[:200])
    with pytest.raises(ValueError, match="not overwritten"):
        write_snapshot(snap, tmp_path)
    assert len(path.read_text()) == 200


def test_the_held_out_tasks_are_split_tasks_and_stay_when_tasks_are_added():
    def tasks(n):
        return [_task(t, [_annotation(t * 10, [], "2026-01-01T00:00:00Z")]) for t in range(1, n)]

    small, big = _snap(tasks(60)), _snap(tasks(120))
    assert list(small.held_out) == sorted(split_tasks(list(range(1, 60)), 0.2)[1])
    assert list(small.train) == split_tasks(list(range(1, 60)), 0.2)[0]
    assert small.held_out and small.train
    assert set(big.held_out) & set(range(1, 60)) == set(small.held_out)
    assert list(_snap(tasks(60), fraction=0.5).held_out) == sorted(
        split_tasks(list(range(1, 60)), 0.5)[1]
    )


def test_new_annotations_since_counts_new_and_edited_not_deleted(export):
    assert new_annotations_since(export, None) == [10, 20, 40, 51]
    snap = _snap(export)
    assert new_annotations_since(export, snap) == []
    now = copy.deepcopy(export)
    now[0]["annotations"][0]["updated_at"] = "2026-02-01T00:00:00Z"  # edited: counts again
    now[1]["annotations"] = []  # deleted: nothing to count
    now[2]["annotations"] = [_annotation(30, _result(), "2026-02-01T00:00:00Z")]  # new
    now[4]["annotations"].pop()  # 51 deleted: 50 is the accepted one again, not in the snapshot
    now.append(_task(6, [_annotation(60, [], "2026-02-02T00:00:00Z", cancelled=True)]))
    assert new_annotations_since(now, snap) == [10, 30, 50]


def test_tasks_of_feeds_label_studio_ground_truth(export):
    snap = _snap(export, fraction=0.5)
    fetched = []

    def fetch(url, task_id):
        fetched.append(task_id)
        return np.zeros((H, W, 3), np.uint8)

    for part, ids in (("train", snap.train), ("held_out", snap.held_out), ("all", (1, 2, 4, 5))):
        truth = label_studio_ground_truth(tasks_of(snap, part), label_config=CONFIG, fetch=fetch)
        assert [s.id for s in truth.samples] == [f"photos/{t}" for t in ids]
        for sample in truth.samples:
            assert sample.load_truth().shape == (H, W)  # the size from the kept "meta"
            assert sample.load_image().shape == (H, W, 3)
    assert sorted(set(fetched)) == [1, 2, 4, 5]  # fetched by task id
    labels = label_studio_ground_truth(tasks_of(snap, "all"), label_config=CONFIG, fetch=fetch)
    assert int(labels.samples[0].load_truth()[5, 5]) == labels.classes.index("cat")


def test_tasks_of_hands_out_copies_and_checks_the_part(export):
    snap = _snap(export)
    tasks_of(snap, "all")[0]["annotations"][0]["result"].clear()
    assert snap.tasks[0]["annotations"][0]["result"]
    with pytest.raises(ValueError, match="part"):
        tasks_of(snap, "test")  # type: ignore[arg-type]


def test_bad_exports_are_refused(export):
    with pytest.raises(ValueError, match="export the project as JSON"):
        _snap([{"image": "a.png", "label": []}])
    no_id = copy.deepcopy(export[0])
    del no_id["id"]
    with pytest.raises(ValueError, match="no task id"):
        _snap([no_id])
    with pytest.raises(ValueError, match="twice"):
        _snap([export[0], export[0]])
    with pytest.raises(ValueError, match="fraction"):
        _snap(export, fraction=1.5)


class _FakeClient:
    """The two SDK calls ``fetch_project_export`` makes; anything else (predictions) fails."""

    def __init__(self, tasks):
        self.calls = []
        self.projects = SimpleNamespace(get=self._get, exports=SimpleNamespace(as_json=self._json))
        self._tasks = tasks

    def _get(self, *, id):
        self.calls.append(("get", id))
        return SimpleNamespace(label_config=CONFIG)

    def _json(self, project_id):
        self.calls.append(("as_json", project_id))
        return copy.deepcopy(self._tasks)

    def __getattr__(self, name):
        raise AssertionError(f"the snapshot asked for {name}")


def test_pull_snapshot_reads_the_export_through_the_sdk_and_writes_it(export, tmp_path):
    client = _FakeClient(export)
    snap, path = pull_snapshot(client, 7, fraction=0.2, now=NOW, folder=tmp_path)
    assert client.calls == [("get", 7), ("as_json", 7)]
    assert snap == _snap(export) and snap.label_config == CONFIG
    assert read_snapshot(path) == snap
