"""Server requests end to end: webhook events, clicks answered with SAM (equal to
``SamPredictor``), text prompts, ``predict --project``'s every path, the thread pools and the
feature cache.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import png_bytes

from ovss_label.backend.server import MediaPolicy, ServerSettings
from ovss_label.backend.server.media import MediaFetcher


def test_webhook_ids_are_read_from_every_shape_label_studio_sends() -> None:
    from ovss_label.backend.server.events import event_ids

    # ANNOTATION_CREATED: one task and one annotation, objects.
    one = {"project": {"id": 7}, "task": {"id": 11}, "annotation": {"id": 21}}
    assert event_ids(one) == (7, [11], [21])
    # ANNOTATIONS_CREATED / _DELETED: lists; a bare id counts, an odd item is skipped.
    many = {"project": {"id": 7}, "tasks": [11, {"id": 12}, "x"], "annotations": [{"id": 21}, 22]}
    assert event_ids(many) == (7, [11, 12], [21, 22])
    # A project given as a bare id is not Label Studio's shape: no project, the rest read.
    assert event_ids({"project": 7, "tasks": [11]}) == (None, [11], [])
    assert event_ids({}) == (None, [], [])


def test_the_event_store_creates_its_folders(tmp_path: Path) -> None:
    from ovss_label.backend.server.events import EventStore

    store = EventStore(tmp_path / "new" / "data" / "events.sqlite3")
    event = store.record('{"action": "START_TRAINING"}', {"action": "START_TRAINING"})
    assert [e["id"] for e in store.all()] == [event]


def test_an_event_without_a_string_action_or_readable_ids_is_still_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ovss_label.backend.server import events

    store = events.EventStore(tmp_path / "events.sqlite")
    store.record("{}", {})
    store.record('{"action": 5}', {"action": 5})

    def unreadable(payload: object) -> object:
        raise KeyError("id")

    monkeypatch.setattr(events, "_fields", unreadable)
    caplog.set_level("WARNING", logger=events.__name__)
    raw = '{"action": "START_TRAINING", "project": {"id": 3}}'
    third = store.record(raw, {"action": "START_TRAINING", "project": {"id": 3}})
    rows = [(e["action"], e["project_id"], e["task_ids"], e["payload"]) for e in store.all()]
    assert rows == [("", None, [], "{}"), ("", None, [], '{"action": 5}'),
                    ("START_TRAINING", None, [], raw)]  # fmt: skip
    assert caplog.messages == [f"event {third} stored without ids: KeyError"]


BRUSH_CLICKS = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Dog"/></RectangleLabels>
</View>"""
POLYGON_CLICKS = BRUSH_CLICKS.replace("BrushLabels", "PolygonLabels")


@pytest.fixture
def clicks_server(tmp_path: Path) -> tuple[object, object, object]:
    """(client, engine, image): a tiny server whose local file ``a.png`` is ``image``."""
    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from ovss_label.backend.server import Engine, create_app

    (tmp_path / "a.png").write_bytes(png_bytes(4, 40, 60))
    image = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    policy = MediaPolicy(local_root=tmp_path)
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "data", media=policy))
    return TestClient(create_app(engine)), engine, image


def _region(kind: str, value: dict[str, object], positive: bool = True) -> dict[str, object]:
    return {"type": kind, "value": value, "original_width": 60, "original_height": 40,
            "from_name": "kp" if kind == "keypointlabels" else "box", "to_name": "image",
            "is_positive": positive}  # fmt: skip


def _ask(client: object, config: str, regions: list[dict[str, object]]) -> dict[str, object]:
    body = {"tasks": [{"id": 9, "data": {"image": "/data/local-files/?d=a.png"}}],
            "project": "3.1763719200", "label_config": config,
            "params": {"context": {"result": regions}}}  # fmt: skip
    answer = client.post("/predict", json=body)
    assert answer.status_code == 200, answer.text
    (prediction,) = answer.json()["results"]
    return prediction


def test_clicks_give_sam_predictors_best_mask_and_a_box_its_single_mask(clicks_server) -> None:
    """The interactive answer is what ``segment_anything.SamPredictor`` gives for the same
    prompt in pixels: the best of three masks for clicks (by predicted IoU), the one mask for a
    box; its score is that IoU clipped to [0, 1]; it carries the served model version."""
    import numpy as np
    from segment_anything import SamPredictor

    from ovss_label.converters import brush_rle_to_mask

    client, engine, image = clicks_server
    predictor = SamPredictor(engine.sam().model)
    predictor.set_image(image)
    cat = {"x": 50, "y": 50, "keypointlabels": ["Cat"]}
    clicks = [
        _region("keypointlabels", cat),
        _region("keypointlabels", {**cat, "x": 10, "y": 10}, False),
    ]
    dog = {"x": 10, "y": 20, "width": 50, "height": 40, "rectanglelabels": ["Dog"]}
    cases = [
        (clicks, {"point_coords": np.array([[30.0, 20.0], [6.0, 4.0]]),
                  "point_labels": np.array([1, 0]), "multimask_output": True}, "Cat"),
        ([_region("rectanglelabels", dog)],
         {"box": np.array([6.0, 8.0, 36.0, 24.0]), "multimask_output": False}, "Dog"),
    ]  # fmt: skip
    for regions, prompt, label in cases:
        masks, scores, _ = predictor.predict(**prompt)
        best = int(scores.argmax())
        prediction = _ask(client, BRUSH_CLICKS, regions)
        (region,) = prediction["result"]
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [label]
        mask = brush_rle_to_mask(region["value"]["rle"], 40, 60)
        np.testing.assert_array_equal(mask > 0, masks[best])
        assert prediction["score"] == round(float(np.clip(scores[best], 0, 1)), 4)
        assert prediction["model_version"] == engine.model_version("naclip")


def test_clicks_in_a_polygon_project_give_a_polygon(clicks_server) -> None:
    client, _, _ = clicks_server
    cat = {"x": 50, "y": 50, "keypointlabels": ["Cat"]}
    regions = _ask(client, POLYGON_CLICKS, [_region("keypointlabels", cat)])["result"]
    assert regions and all(r["type"] == "polygonlabels" for r in regions)  # one per part
    assert all(r["value"]["polygonlabels"] == ["Cat"] for r in regions)


def test_a_click_that_fails_answers_an_empty_prediction_and_logs_why(
    clicks_server, caplog: pytest.LogCaptureFixture
) -> None:
    client, engine, _ = clicks_server
    caplog.set_level("WARNING")
    odd = _region("keypointlabels", {"x": "left", "y": 50, "keypointlabels": ["Cat"]})
    prediction = _ask(client, BRUSH_CLICKS, [odd])
    version = engine.model_version("naclip")
    assert prediction == {"result": [], "score": 0.0, "model_version": version}
    assert "task 9: no interactive mask: ValueError: could not convert string to float: 'left'" in (
        caplog.messages
    )


def test_a_sam_that_cannot_be_built_is_named(tmp_path: Path) -> None:
    from ovss_label.backend.server import Engine
    from ovss_label.backend.server.engine import ModelUnavailableError

    engine = Engine(ServerSettings(tiny=True, sam_model="sam_nope", data_dir=tmp_path))
    with pytest.raises(ModelUnavailableError, match=r"^sam_nope cannot be loaded: "):
        engine.sam()


def test_closing_the_engine_drops_queued_work_without_waiting_for_running_work(
    tmp_path: Path,
) -> None:
    """Shutdown (uvicorn's lifespan) must not wait for a prediction stuck on slow media."""
    import threading

    from ovss_label.backend.server import Engine

    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path))
    release, started = threading.Event(), threading.Semaphore(0)

    def stuck() -> None:
        started.release()
        release.wait(30)

    running = [pool.submit(stuck) for pool in (engine.clicks, engine.webhooks)]
    assert started.acquire(timeout=10) and started.acquire(timeout=10)
    queued = [pool.submit(lambda: "ran") for pool in (engine.clicks, engine.webhooks)]
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(timeout=10)
    try:
        assert not closer.is_alive()  # returned while the running work still runs
        assert all(f.cancelled() for f in queued)
        assert not any(f.done() for f in running)
    finally:
        release.set()


def test_predict_project_posts_new_skips_done_retries_transient_and_empties_broken(
    tmp_path: Path,
) -> None:
    """``predict --project``: every task of the project, read from the SDK's task models; a
    task with this model's prediction is skipped, a good one gets its prediction, a broken
    image an empty one, a 503 none (the next run retries it); the report and progress count
    them all."""
    import httpx
    from label_studio_sdk.types import LseTask

    from ovss_label.backend.server import Engine
    from ovss_label.backend.server.batch import predict_project

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "a.png").write_bytes(png_bytes(4, 40, 60))
    policy = MediaPolicy(local_root=tmp_path)
    busy = httpx.MockTransport(lambda request: httpx.Response(503))
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "data", media=policy),
                    MediaFetcher(policy, busy))  # fmt: skip
    version = engine.model_version("naclip")
    urls = {1: "/data/local-files/?d=a.png", 2: "/data/local-files/?d=a.png",
            3: "/data/local-files/?d=broken.jpg", 4: "http://media.test/busy.png",
            5: "/data/local-files/?d=a.png", 6: "http://media.test/busy2.png"}  # fmt: skip
    tasks = [LseTask.model_construct(id=i, data={"image": u}) for i, u in urls.items()]
    calls: dict[str, list[Any]] = {"get": [], "list": [], "tasks": [], "create": [], "with": []}
    earlier = [SimpleNamespace(task=1, model_version=version), SimpleNamespace(task=2),
               SimpleNamespace(task=3, model_version="naclip·older"),
               SimpleNamespace(task=5, model_version=version)]  # fmt: skip
    fake = SimpleNamespace(
        projects=SimpleNamespace(get=lambda id: calls["get"].append(id)
                                 or SimpleNamespace(label_config=BRUSH_CLICKS)),
        predictions=SimpleNamespace(list=lambda project: calls["list"].append(project) or earlier,
                                    create=lambda **kw: calls["create"].append(kw)),
        tasks=SimpleNamespace(list=lambda project, fields: calls["tasks"].append((project, fields))
                              or tasks),
    )  # fmt: skip
    predict_task = engine.predict_task

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls["with"].append(kwargs["project_id"])  # its zero-shot calibration
        return predict_task(*args, **kwargs)

    engine.predict_task = spy  # type: ignore[method-assign]
    progress = Recording()
    report = predict_project(engine, fake, 3, progress=progress)
    assert calls["get"] == calls["list"] == [3] and calls["tasks"] == [(3, "all")]
    assert calls["with"] == [3, 3, 3, 3]
    assert [p["task"] for p in calls["create"]] == [2, 3]
    good, broken = calls["create"]
    assert good["result"] and good["model_version"] == broken["model_version"] == version
    assert 0 < good["score"] <= 1 and broken["result"] == [] and broken["score"] == 0.0
    assert (report.job, report.model_version) == ("predict --project 3", version)
    assert (report.done, report.skipped, report.retry, report.counts) == (2, 2, 2, {"empty": 1})
    assert progress.seen == [("total", 6)] + [("advance", f"task {i}") for i in urls]


class Recording:
    """A ``jobs.Progress`` that records its calls."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def total(self, count: int | None) -> None:
        self.seen.append(("total", count))

    def advance(self, item: str = "") -> None:
        self.seen.append(("advance", item))


def _textarea(value: object) -> dict[str, object]:
    return {"type": "textarea", "value": value}


@pytest.mark.parametrize(
    ("result", "text"),
    [
        ([5, "x", _textarea({"text": [" cat  "]})], "cat"),  # odd items skipped, text stripped
        ([_textarea({"text": "dog"})], "dog"),  # a bare string
        ([_textarea({"text": []}), _textarea({"text": ["cup"]})], "cup"),
        ([_textarea({"text": ["  "]})], None),  # blank: no query
        ([_textarea("cat")], None),  # no value object: no text
        ([{"type": "labels", "value": {"text": ["cat"]}}], None),  # not a textarea
    ],
)  # fmt: skip
def test_the_text_prompt_is_the_first_non_blank_textarea_text(
    result: list[Any], text: str | None
) -> None:
    from ovss_label.backend.server.interactive import text_prompt

    assert text_prompt({"result": result}) == text


def test_a_textarea_text_that_is_not_strings_is_refused() -> None:
    from ovss_label.backend.server.interactive import text_prompt

    with pytest.raises(ValueError) as refused:
        text_prompt({"result": [{"type": "textarea", "value": {"text": [3]}}]})
    assert str(refused.value) == "a textarea region's value.text must be a list of strings"


def test_predictions_run_in_the_bounded_task_pool(tmp_path: Path) -> None:
    """``--workers`` bounds the tasks predicted at once: they run on the engine's own pool."""
    import threading

    from fastapi.testclient import TestClient

    from ovss_label.backend.server import Engine, create_app

    (tmp_path / "a.png").write_bytes(png_bytes(4, 40, 60))
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "data",
                                   media=MediaPolicy(local_root=tmp_path)))  # fmt: skip
    threads = []
    predict_task = engine.predict_task

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return predict_task(*args, **kwargs)

    engine.predict_task = spy  # type: ignore[method-assign]
    tasks = [{"id": i, "data": {"image": "/data/local-files/?d=a.png"}} for i in (1, 2, 3)]
    body = {"tasks": tasks, "label_config": BRUSH_CLICKS}
    assert len(TestClient(create_app(engine)).post("/predict", json=body).json()["results"]) == 3
    assert len(threads) == 3 and all(name.startswith("ovss-task") for name in threads)


def test_clicks_run_on_their_own_thread_and_a_failed_text_query_answers_empty(
    clicks_server, caplog: pytest.LogCaptureFixture
) -> None:
    """Clicks have their own one-thread pool (a click never queues behind batch tasks); a text
    query that cannot run (e.g. missing weights) is a logged reason and empty answers."""
    import threading

    client, engine, _ = clicks_server
    threads = []
    interactive = engine._interactive

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return interactive(*args, **kwargs)

    engine._interactive = spy
    cat = {"x": 50, "y": 50, "keypointlabels": ["Cat"]}
    assert _ask(client, BRUSH_CLICKS, [_region("keypointlabels", cat)])["result"]
    assert len(threads) == 1 and threads[0].startswith("ovss-click")

    def no_weights(*args: Any) -> Any:
        raise FileNotFoundError("ViT-B-16.pt is not in the weights folder")

    engine._text_query = no_weights
    caplog.set_level("WARNING")
    config = BRUSH_CLICKS.replace("</View>", '<TextArea name="q" toName="image"/></View>')
    answer = _ask(client, config, [{"type": "textarea", "value": {"text": ["cat"]}}])
    assert answer == {"result": [], "score": 0.0, "model_version": engine.model_version("naclip")}
    assert "text prompt: FileNotFoundError: ViT-B-16.pt is not in the weights folder" in (
        caplog.messages
    )


def test_a_second_prediction_of_an_image_reuses_its_features(clicks_server) -> None:
    client, engine, _ = clicks_server
    body = {"tasks": [{"id": 9, "data": {"image": "/data/local-files/?d=a.png"}}],
            "label_config": BRUSH_CLICKS}  # fmt: skip
    counts = []
    for _ in range(2):
        assert client.post("/predict", json=body).json()["results"][0]["result"]
        counts.append((engine.cache.misses, engine.cache.hits))
    (encoded, _), (again, reused) = counts
    assert encoded > 0 and again == encoded and reused == encoded  # every lookup a hit


def test_a_click_prompt_reads_every_click_whatever_comes_before_it() -> None:
    """Regions that are not prompts (a brush stroke) are skipped, not the end of the list; a
    label may come under ``labels`` (a separate Labels control); a click without a label keeps
    the one before; a box alone has no point labels; no result at all is an empty prompt."""
    import numpy as np

    from ovss_label.backend.server.interactive import click_prompt

    stroke = {"type": "brushlabels", "value": {"rle": [1, 2], "brushlabels": ["Dog"]}}
    context = {"result": [
        stroke,
        {"type": "keypointlabels", "value": {"x": 50, "y": 25, "labels": ["Cat"]}},
        {"type": "keypointlabels", "value": {"x": 0, "y": 100}, "is_positive": False},
    ]}  # fmt: skip
    prompt = click_prompt(context, 40, 60)
    np.testing.assert_allclose(prompt.points, [[30, 10], [0, 40]])
    assert prompt.point_labels.tolist() == [1, 0] and prompt.label == "Cat"
    box = {"type": "rectanglelabels", "value": {"x": 0, "y": 0, "width": 50, "height": 50}}
    boxed = click_prompt({"result": [box]}, 40, 60)
    assert boxed.points is None and boxed.point_labels is None and boxed.label is None
    np.testing.assert_allclose(boxed.box, [0, 0, 30, 20])
    empty = click_prompt({}, 40, 60)
    assert (empty.points, empty.point_labels, empty.box, empty.label) == (None, None, None, None)


@pytest.mark.parametrize("predicted_iou, score", [(1.3, 1.0), (-0.2, 0.0), (0.25, 0.25)])
def test_a_clicks_score_is_sams_predicted_iou_clipped_to_0_1(
    monkeypatch: pytest.MonkeyPatch, predicted_iou: float, score: float
) -> None:
    import numpy as np

    from ovss_label.backend.predict import Output
    from ovss_label.backend.server import interactive

    mask = np.zeros((1, 20, 30), bool)
    mask[0, 5:10, 5:20] = True
    monkeypatch.setattr(interactive, "SamEncoder", lambda sam: SimpleNamespace())
    cache = SimpleNamespace(features=lambda encoder, image: None)
    monkeypatch.setattr(
        interactive, "decode", lambda *a, **k: (mask, np.array([predicted_iou], np.float32))
    )
    click = {"type": "keypointlabels", "value": {"x": 50, "y": 50, "keypointlabels": ["Cat"]}}
    results, got = interactive.interactive_prediction(
        None, cache, np.zeros((20, 30, 3), np.uint8), {"result": [click]}, Output(), ("Cat",)
    )
    assert got == pytest.approx(score)
    (region,) = results
    assert region["score"] == pytest.approx(score) and region["value"]["brushlabels"] == ["Cat"]


def test_a_second_click_on_an_image_reuses_the_decoders_image_work() -> None:
    """One cache entry for SAM's image embedding, one for the decoder's image-only work
    (``sam_decoder.py``); the second click adds neither."""
    import numpy as np

    from ovss_label.backend.models.sam import TINY_SAM_CFG, LoadedSam, _create_sam
    from ovss_label.backend.predict import Output
    from ovss_label.backend.proposers import FeatureCache
    from ovss_label.backend.server.interactive import interactive_prediction

    sam = LoadedSam(_create_sam(TINY_SAM_CFG), "sam_tiny", True)
    cache, image = FeatureCache(), np.full((40, 60, 3), 90, np.uint8)
    click = {"type": "keypointlabels", "value": {"x": 50, "y": 50, "keypointlabels": ["Cat"]}}
    for x in (50, 20):
        click["value"]["x"] = x
        interactive_prediction(sam, cache, image, {"result": [click]}, Output(), ("Cat",))
        assert len(cache) == 2


def test_a_tasks_failure_is_told_by_its_type_and_redacted_message() -> None:
    """The one rule for the server, ``predict --project`` and Ray: the exception's type and
    its message without credentials; media decides if it may pass, other value errors are
    the input's (permanent), anything else the server's (transient)."""
    from ovss_label.backend.server.engine import task_failure
    from ovss_label.backend.server.media import MediaError

    url = "http://media.test/a.png?X-Amz-Signature=topsecret"
    reason, transient = task_failure(MediaError(f"HTTP 503 for {url}", transient=True))
    assert reason.startswith("MediaError: HTTP 503 for http://media.test/a.png")
    assert "topsecret" not in reason and transient
    assert task_failure(ValueError("too elongated")) == ("ValueError: too elongated", False)
    assert task_failure(MemoryError("out of memory")) == ("MemoryError: out of memory", True)


def test_a_polygon_prediction_drops_parts_below_min_area_and_rounds_its_score(
    clicks_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SAM-refined instances can keep a speck after overlaps are resolved: the polygon
    answer leaves parts below ``min_area`` out (as ``predict`` does); the score has 4 decimals
    and the feature cache is the engine's (a text query or click on the image reuses it)."""
    import numpy as np

    from ovss_label.backend.proposers import Proposal
    from ovss_label.backend.server import engine as engine_module
    from ovss_label.converters import Instance

    _, engine, _ = clicks_server
    seen = []

    def propose(proposer, image, vocabulary, cache):  # type: ignore[no-untyped-def]
        seen.append(cache)
        mask = np.zeros(image.shape[:2], bool)
        mask[5:25, 5:35], mask[35, 55] = True, True  # a 20 x 30 part and a 1-pixel speck
        scores = np.full((len(vocabulary.names), *mask.shape), 0.123456, np.float32)
        return Proposal(tuple(vocabulary.names), scores, instances=[Instance(mask, "Cat", 0.9)])

    monkeypatch.setattr(engine_module, "propose", propose)
    project, head = engine.served(POLYGON_CLICKS, None)
    task = {"id": 9, "data": {"image": "/data/local-files/?d=a.png"}}
    prediction = engine.predict_task(task, project, head=head)
    assert prediction is not None and seen == [engine.cache]
    (region,) = prediction["result"]  # the speck (1 of 2,400 pixels < 0.001) is left out
    assert region["type"] == "polygonlabels" and len(region["value"]["points"]) >= 4
    assert prediction["score"] == 0.1235


def test_each_kind_of_work_runs_on_its_own_pool(clicks_server) -> None:
    """Reading the config and choosing the model run on the control pool (never behind a
    busy task pool), a text query and the tasks on the task pool."""
    import threading

    client, engine, _ = clicks_server
    seen: list[tuple[str, str]] = []

    def spy(name: str) -> None:
        real = getattr(engine, name)

        def record(*args: Any) -> Any:
            seen.append((name, threading.current_thread().name.split("_")[0]))
            return real(*args)

        setattr(engine, name, record)

    for name in ("served", "choice", "_text_query", "_entry"):
        spy(name)
    config = BRUSH_CLICKS.replace("</View>", '<TextArea name="q" toName="image"/></View>')
    assert _ask(client, config, [{"type": "textarea", "value": {"text": ["cat"]}}])["result"]
    assert _ask(client, "<View>", [{"type": "textarea", "value": {"text": ["cat"]}}])
    assert seen == [
        ("served", "ovss-control"), ("choice", "ovss-control"),  # served asks choice
        ("_text_query", "ovss-task"), ("_entry", "ovss-task"),
        ("served", "ovss-control"), ("choice", "ovss-control"),  # refused: the model's version
    ]  # fmt: skip


def test_a_tasks_own_id_presigns_its_cloud_image_and_a_task_must_be_an_object(
    tmp_path: Path,
) -> None:
    """Only an integer task id reaches Label Studio's presign route (a string id is no id:
    the task fails with the reason); a task or data that is not an object is refused."""
    import base64

    import httpx

    from ovss_label.backend.server import Engine
    from ovss_label.backend.server.media import MediaError

    seen = []

    def label_studio(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.url.params.get("fileuri")))
        return httpx.Response(404)

    policy = MediaPolicy(ls_url="http://ls.test", ls_token="secret-token")
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "data", media=policy),
                    MediaFetcher(policy, httpx.MockTransport(label_studio)))  # fmt: skip
    project, _ = engine.served(BRUSH_CLICKS, None)
    cloud = {"image": "s3://bucket/a.png"}
    with pytest.raises(MediaError):
        engine._image({"id": 42, "data": cloud}, project)
    encoded = base64.urlsafe_b64encode(b"s3://bucket/a.png").decode()
    assert seen == [("/tasks/42/presign/", encoded)]
    with pytest.raises(
        MediaError, match=r"^a cloud-storage URL needs the task id to be presigned$"
    ):
        engine._image({"id": "42", "data": cloud}, project)
    for task in ("x", {"id": 1, "data": "s3://bucket/a.png"}, {"id": 1}):
        with pytest.raises(MediaError, match=r"^the task is not an object with a data object$"):
            engine._image(task, project)
    assert len(seen) == 1
    engine.close()


def test_unreadable_versions_serve_zero_shot_and_say_why(caplog: pytest.LogCaptureFixture) -> None:
    import sqlite3

    from ovss_label.backend.server.choice import Chooser

    def locked() -> Any:
        raise sqlite3.OperationalError("database is locked")

    caplog.set_level("WARNING")
    assert Chooser(locked)(5, "naclip") == ("naclip", None)
    assert caplog.messages == [
        "project 5: versions unreadable, serving zero-shot: database is locked"
    ]


def test_a_proposer_being_built_holds_up_its_own_key_only() -> None:
    """Loading one trained version (seconds to minutes) must not stall requests for another."""
    import threading

    from ovss_label.backend.server.choice import ProposerCache

    cache, started, release = ProposerCache(), threading.Event(), threading.Event()

    def slow() -> object:
        started.set()
        release.wait(10)
        return "slow"

    builder = threading.Thread(target=lambda: cache.get(("fmbseg", "a"), slow))
    builder.start()
    assert started.wait(10)
    other: list[object] = []
    quick = threading.Thread(target=lambda: other.append(cache.get(("fmbseg", "b"), object)))
    quick.start()
    quick.join(2)
    waited = quick.is_alive()
    release.set()
    builder.join(10)
    quick.join(10)
    assert not waited and len(other) == 1


def test_the_engines_proposers_share_its_feature_cache_and_name_what_failed(
    tmp_path: Path,
) -> None:
    """A ``+sam`` method's SAM features are the ones clicks use (one cache); a method that
    cannot be built is named in the error."""
    from ovss_label.backend.server import Engine
    from ovss_label.backend.server.engine import ModelUnavailableError

    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "data"))
    assert engine.proposer("naclip+sam").cache is engine.cache
    with pytest.raises(ModelUnavailableError, match=r"^naclip_nope cannot be loaded: "):
        engine.proposer("naclip_nope")
    engine.close()


def test_a_text_query_is_labelled_by_the_served_versions_text_embedder(
    clicks_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trained version (a head) may carry another text tower than the zero-shot method: the
    label a text query's masks get is chosen by the embedder of the version that serves it."""
    import torch

    from ovss_label.ontologies import Vocabulary

    client, engine, _ = clicks_server

    class Toward:  # an encoder for which every query is nearest the label at ``idx``
        def __init__(self, idx: int) -> None:
            self.idx = idx

        def query_features(self, vocabulary: Vocabulary) -> tuple[torch.Tensor, list[int]]:
            if vocabulary.names == ("q",):  # the query, as label_for_text embeds it
                return torch.eye(2)[self.idx][None], [0]
            return torch.eye(2), [0, 1]  # the labels Cat, Dog

    asked = []

    def proposer(method: str, head: str | None = None) -> Any:
        asked.append((method, head))
        return SimpleNamespace(text_embedder=lambda: Toward(0 if head is None else 1))

    monkeypatch.setattr(engine, "proposer", proposer)
    project = engine.projects.get(BRUSH_CLICKS)
    assert engine._text_query(project, "kitty")[1] == "Cat"
    assert engine._text_query(project, "kitty", "run-7")[1] == "Dog"
    assert asked == [("naclip", None), ("naclip", "run-7")]

    # predict hands the head it serves to the text query
    heads = []

    def text_query(project: Any, text: str, head: str | None = None) -> Any:
        heads.append((text, head))
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine, "served", lambda config, pid: (project, "run-7"))
    monkeypatch.setattr(engine, "_text_query", text_query)
    config = BRUSH_CLICKS.replace("</View>", '<TextArea name="q" toName="image"/></View>')
    _ask(client, config, [{"type": "textarea", "value": {"text": ["kitty"]}}])
    assert heads == [("kitty", "run-7")]
