"""The server serves each project's active trained version (``server/choice.py``): ``/setup``
and every prediction carry its ``model_version``, a rollback is seen at the next request, and a
project with no usable version keeps its zero-shot method."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.label_interface.interface import LabelInterface
from PIL import Image

from ovss_label.backend.learning.versions import HEAD_FILE, Version, VersionStore, heads_dir
from ovss_label.backend.models.weights import sha256_file
from ovss_label.backend.proposers import method_plan
from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings, create_app
from ovss_label.backend.server.choice import ProposerCache, project_id
from ovss_label.backend.store import events_path

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Cat" predicted_values="cat, kitten"/><Label value="Dog"/>
  </BrushLabels>
</View>"""
SAM_CONFIG = CONFIG.replace('toName="image">', 'toName="image" ovss_method="naclip+sam">')


@pytest.fixture()
def served(tmp_path):
    """(client, engine, data dir): a tiny server whose local files hold ``photos/a.png``."""
    root = tmp_path / "files"
    (root / "photos").mkdir(parents=True)
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    (root / "photos" / "a.png").write_bytes(buffer.getvalue())
    data = tmp_path / "data"
    engine = Engine(ServerSettings(tiny=True, data_dir=data, media=MediaPolicy(local_root=root)))
    yield TestClient(create_app(engine)), engine, data
    engine.close()


def _promote(data: Path, project: int, head: Path, folder: str = "run1") -> Version:
    """A trained version of ``project`` registered and activated, as the CLI does in another
    process (its own ``VersionStore``)."""
    target = heads_dir(data, project) / folder
    target.mkdir(parents=True)
    shutil.copy(head, target / HEAD_FILE)
    plan = method_plan("fmbseg", head=str(target / HEAD_FILE), tiny=True)
    store = VersionStore(events_path(data), data)
    version = store.register(
        project, target, model_version=plan.identity.version,
        head_sha256=sha256_file(target / HEAD_FILE), metrics={"miou": 0.42},
    )  # fmt: skip
    return store.activate(project, version.name)


def _setup(client: TestClient, project: object, schema: str = CONFIG) -> str:
    body = {"project": project, "schema": schema, "hostname": "http://ls.test", "access_token": "x"}
    response = client.post("/setup", json=body)
    assert response.status_code == 200
    version: str = response.json()["model_version"]
    return version


def _predict(client: TestClient, project: int, body_project: object = "auto") -> list[dict]:
    task = {"id": 1, "data": {"image": "/data/local-files/?d=photos/a.png"}, "annotations": [],
            "predictions": [], "project": project, "inner_id": 1}  # fmt: skip
    body = {"tasks": [task], "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": None}}  # fmt: skip
    if body_project == "auto":
        body["project"] = f"{project}.1763719200"
    elif body_project is not None:
        body["project"] = body_project
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results: list[dict] = response.json()["results"]
    return results


def test_a_promoted_version_serves_its_project_only(served, tiny_head):
    client, engine, data = served
    zero_shot = engine.model_version("naclip")
    assert _setup(client, "5.1763719200") == zero_shot
    version = _promote(data, 5, tiny_head)
    assert version.model_version.startswith("fmbseg·")
    assert _setup(client, "5.1763719200") == version.model_version  # no restart
    assert _setup(client, 5) == version.model_version  # an int id too
    (prediction,) = _predict(client, 5)
    assert prediction["model_version"] == version.model_version
    assert LabelInterface(CONFIG).validate_prediction(prediction)
    (by_task,) = _predict(client, 5, body_project=None)  # the tasks' project field
    assert by_task["model_version"] == version.model_version
    assert _setup(client, "6.1763719200") == zero_shot  # no version: zero-shot as before
    (other,) = _predict(client, 6)
    assert other["model_version"] == zero_shot
    assert _setup(client, "5.1763719200", SAM_CONFIG).startswith("fmbseg+sam·")


def test_rollback_is_seen_at_the_next_setup(served, tiny_head):
    client, engine, data = served
    version = _promote(data, 5, tiny_head)
    assert _setup(client, "5.1") == version.model_version
    store = VersionStore(events_path(data), data)
    assert store.deactivate(5) == version  # back to zero-shot; returns the one that was
    assert _setup(client, "5.1") == engine.model_version("naclip")
    (prediction,) = _predict(client, 5)
    assert prediction["model_version"] == engine.model_version("naclip")
    store.activate(5, version.name)  # `ovss-label models activate --project 5 v1`
    assert _setup(client, "5.1") == version.model_version


def test_projects_with_different_heads_get_different_proposers(served, tiny_head):
    _, engine, data = served
    five, seven = _promote(data, 5, tiny_head), _promote(data, 7, tiny_head, "other")
    (m5, h5), (m7, h7) = engine.choice(5, "naclip"), engine.choice(7, "naclip")
    assert m5 == m7 == "fmbseg" and h5 != h7
    assert engine.proposer(m5, h5) is not engine.proposer(m7, h7)
    assert engine.proposer(m5, h5) is engine.proposer(m5, h5)
    assert engine.model_version(m5, h5) == five.model_version
    assert engine.model_version(m7, h7) == seven.model_version


def test_a_version_without_its_head_file_falls_back_with_a_warning(served, tiny_head, caplog):
    client, engine, data = served
    version = _promote(data, 5, tiny_head)
    VersionStore(events_path(data), data).head_path(version).unlink()
    caplog.set_level(logging.WARNING)
    assert _setup(client, "5.1763719200") == engine.model_version("naclip")
    (prediction,) = _predict(client, 5)
    assert prediction["model_version"] == engine.model_version("naclip")
    other = _promote(data, 6, tiny_head)  # warned about too: once per version, not once
    VersionStore(events_path(data), data).head_path(other).unlink()
    _predict(client, 6)
    _predict(client, 5)
    warnings = [r.getMessage() for r in caplog.records if "has no head file" in r.getMessage()]
    store = VersionStore(events_path(data), data)
    assert warnings == [  # once per version, not per call
        f"project {v.project}: active version {v.name} has no head file at "
        f"{store.head_path(v)}; serving the zero-shot method (`ovss-label models activate` "
        "another version or retrain)"
        for v in (version, other)
    ]


def test_versions_lists_each_projects_versions(served, tiny_head):
    client, _, data = served
    assert client.get("/versions").json()["projects"] == {}
    version = _promote(data, 5, tiny_head)
    projects = client.get("/versions").json()["projects"]
    assert list(projects) == ["5"] and len(projects["5"]) == 1
    listed = projects["5"][0]
    assert listed["name"] == version.name and listed["active"] is True
    assert listed["model_version"] == version.model_version
    assert listed["metrics"] == {"miou": 0.42}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5.1700000000", 5), (5, 5), ("5", 5), ("abc", None), ("", None), (None, None),
     (True, None), (-1, None), ("-1.5", None), ("５.1", None), ({"id": 5}, None),
     (0, 0), ("0.1700000000", 0)],  # 0 read alike from an int and a string
)  # fmt: skip
def test_project_ids_as_label_studio_sends_them(value, expected):
    assert project_id(value) == expected


def test_malformed_projects_are_served_as_no_project(served, tiny_head):
    client, engine, data = served
    _promote(data, 5, tiny_head)
    assert _setup(client, "five.1") == engine.model_version("naclip")
    assert _setup(client, None) == engine.model_version("naclip")


def test_head_proposers_are_bounded_and_zero_shot_ones_kept():
    cache = ProposerCache(max_heads=2)
    built: list[tuple[str, str | None]] = []

    def build(key):
        built.append(key)
        return object()

    zero = cache.get(("naclip", None), lambda: build(("naclip", None)))
    for head in ("a", "b", "c"):
        cache.get(("fmbseg", head), lambda h=head: build(("fmbseg", h)))
    assert cache.peek(("fmbseg", "a")) is None  # least recently used: evicted
    assert cache.peek(("fmbseg", "c")) is not None and cache.peek(("naclip", None)) is zero
    assert cache.peek(("fmbseg", "b")) is not None  # exactly max_heads are kept
    # An evicted head's build lock goes with it: a long-running server that has served many
    # versions holds locks for the proposers it keeps only.
    assert set(cache._building) == {("naclip", None), ("fmbseg", "b"), ("fmbseg", "c")}
    cache.get(("fmbseg", "a"), lambda: build(("fmbseg", "a")))  # rebuilt on next use
    assert built.count(("fmbseg", "a")) == 2 and cache.peek(("fmbseg", "b")) is None


def test_predict_project_posts_the_projects_active_version(served, tiny_head):
    from types import SimpleNamespace

    from ovss_label.backend.server.batch import predict_project

    _, engine, data = served
    active = _promote(data, 5, tiny_head)
    posted = []
    task = {"id": 1, "data": {"image": "/data/local-files/?d=photos/a.png"}}
    fake = SimpleNamespace(
        projects=SimpleNamespace(get=lambda id: SimpleNamespace(label_config=CONFIG)),
        predictions=SimpleNamespace(list=lambda project: [], create=lambda **kw: posted.append(kw)),
        tasks=SimpleNamespace(list=lambda project, fields: [task]),
    )
    report = predict_project(engine, fake, 5)
    assert report.done == 1 and report.model_version == active.model_version
    assert [p["model_version"] for p in posted] == [active.model_version]


def test_text_prompts_and_clicks_are_answered_by_the_projects_version(served, tiny_head):
    """A TextArea query runs the project's trained version (its head, not the server's: this
    server has none), and a click's answer carries that version too."""
    client, _, data = served
    version = _promote(data, 5, tiny_head)
    config = CONFIG.replace(
        "</View>",
        '<TextArea name="prompt" toName="image"/>'
        '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/>'
        "</KeyPointLabels>"
        "</View>",
    )
    text = {"type": "textarea", "value": {"text": ["kitten"]}, "from_name": "prompt",
            "to_name": "image"}  # fmt: skip
    click = {"type": "keypointlabels", "value": {"x": 50, "y": 50, "keypointlabels": ["Cat"]},
             "from_name": "kp", "to_name": "image", "original_width": 60,
             "original_height": 40}  # fmt: skip
    task = {"id": 1, "data": {"image": "/data/local-files/?d=photos/a.png"}, "project": 5}
    for region in (text, click):
        body = {"tasks": [task], "label_config": config, "project": "5.1763719200",
                "params": {"context": {"result": [region]}}}  # fmt: skip
        (prediction,) = client.post("/predict", json=body).json()["results"]
        assert prediction["model_version"] == version.model_version
        assert prediction["result"], region["type"]  # answered, not an empty failure
        labels = {r["value"].get("brushlabels", ["?"])[0] for r in prediction["result"]}
        assert labels == {"Cat"}


def test_a_failed_task_of_a_trained_project_carries_its_version(served, tiny_head):
    client, _, data = served
    version = _promote(data, 5, tiny_head)
    task = {"id": 1, "data": {"image": "/data/local-files/?d=photos/missing.png"}, "project": 5}
    body = {"tasks": [task], "label_config": CONFIG, "project": "5.1763719200"}
    (prediction,) = client.post("/predict", json=body).json()["results"]
    assert prediction == {"result": [], "score": 0.0, "model_version": version.model_version}


def test_a_click_that_fails_or_an_odd_task_answers_empty_in_the_projects_version(served, tiny_head):
    """A click SAM cannot read (a non-number coordinate) or a task that is not an object:
    the editor gets an empty answer in the project's trained version, never a 500."""
    client, _, data = served
    version = _promote(data, 5, tiny_head)
    config = CONFIG.replace(
        "</View>",
        '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/>'
        "</KeyPointLabels></View>",
    )
    odd = {"type": "keypointlabels", "value": {"x": "left", "y": 50, "keypointlabels": ["Cat"]},
           "from_name": "kp", "to_name": "image", "original_width": 60,
           "original_height": 40}  # fmt: skip
    good = {**odd, "value": {**odd["value"], "x": 50}}
    task = {"id": 1, "data": {"image": "/data/local-files/?d=photos/a.png"}}
    empty = {"result": [], "score": 0.0, "model_version": version.model_version}
    for tasks, click in (([task], odd), ([7], good)):
        body = {"tasks": tasks, "label_config": config, "project": "5.1763719200",
                "params": {"context": {"result": [click]}}}  # fmt: skip
        answer = client.post("/predict", json=body)
        assert answer.status_code == 200 and answer.json()["results"] == [empty]


def test_a_live_request_with_a_refused_config_answers_empty_in_the_projects_version(
    served, tiny_head, caplog
):
    """A click or a text query must get an answer the editor shows, even when the labeling
    config is refused; batch requests get "nothing for now" instead (tested elsewhere)."""
    client, engine, data = served
    version = _promote(data, 5, tiny_head)
    caplog.set_level(logging.WARNING)
    click = {"type": "keypointlabels", "value": {"x": 50, "y": 50, "keypointlabels": ["Cat"]},
             "original_width": 60, "original_height": 40}  # fmt: skip
    task = {"id": 1, "data": {"image": "/data/local-files/?d=photos/a.png"}}
    for project, expected in ((5, version.model_version), (6, engine.model_version("naclip"))):
        body = {"tasks": [task, {**task, "id": 2}], "label_config": "<View>",
                "project": f"{project}.1", "params": {"context": {"result": [click]}}}  # fmt: skip
        empty = {"result": [], "score": 0.0, "model_version": expected}
        assert client.post("/predict", json=body).json()["results"] == [empty, empty]
    refused = [
        m for m in caplog.messages if m.startswith("labeling config refused for 2 task(s): ")
    ]
    assert len(refused) == 2
    assert refused[0].startswith(
        "labeling config refused for 2 task(s): cannot parse the labeling config: "
    ) and refused[0].endswith("; pass valid Label Studio XML")


def test_the_bodys_project_wins_over_the_tasks_field(served, tiny_head):
    client, engine, data = served
    version = _promote(data, 5, tiny_head)
    task = {"id": 1, "data": {"image": "/data/local-files/?d=photos/a.png"}, "project": 6}
    for body_project, expected in (("5.1763719200", version), ("6.1763719200", None)):
        body = {"tasks": [task], "label_config": CONFIG, "project": body_project}
        (prediction,) = client.post("/predict", json=body).json()["results"]
        served_version = expected.model_version if expected else engine.model_version("naclip")
        assert prediction["model_version"] == served_version


def test_a_text_query_that_fails_or_waits_answers_empty_in_the_projects_version(
    served, tiny_head, monkeypatch, caplog
):
    client, engine, data = served
    version = _promote(data, 5, tiny_head)
    config = CONFIG.replace("</View>", '<TextArea name="q" toName="image"/></View>')
    task = {"id": 1, "data": {"image": "/data/local-files/?d=photos/a.png"}}
    query = {"result": [{"type": "textarea", "value": {"text": ["cat"]}}]}
    body = {"tasks": [task], "label_config": config, "project": "5.1763719200",
            "params": {"context": query}}  # fmt: skip
    empty = {"result": [], "score": 0.0, "model_version": version.model_version}
    monkeypatch.setattr(engine, "predict_task", lambda *a, **k: None)  # a failure that may pass
    assert client.post("/predict", json=body).json()["results"] == [empty]  # shown, not "later"

    def broken(*args):
        raise RuntimeError("no text encoder")

    monkeypatch.setattr(engine, "_text_query", broken)
    caplog.set_level(logging.WARNING)
    assert client.post("/predict", json=body).json()["results"] == [empty]
    assert "text prompt: RuntimeError: no text encoder" in caplog.messages
