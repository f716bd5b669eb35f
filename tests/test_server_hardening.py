"""The server under load and hostile input: webhooks and /health never wait on predictions or
config parses, every malformed request gets a 4xx, every webhook is stored, labels at scale."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from helpers import half_and_half, png_bytes

from ovss_label.backend.proposers import method_plan
from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings, create_app
from ovss_label.backend.server.interactive import label_for_text
from ovss_label.backend.server.media import MediaFetcher
from ovss_label.backend.server.projects import ProjectCache, parse_project
from ovss_label.ontologies import Vocabulary

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
</View>"""
PROJECT = {"id": 3, "title": "p", "label_config": CONFIG}


def _config(n_labels: int) -> str:
    labels = "".join(f'<Label value="class {i}"/>' for i in range(n_labels))
    return CONFIG.replace('<Label value="Cat"/><Label value="Dog"/>', labels)


def _task(task_id: int, url: str) -> dict:
    return {"id": task_id, "data": {"image": url}, "project": 3}


@contextmanager
def _live(engine: Engine) -> Iterator[str]:
    """The app on a real uvicorn on loopback (the test client serialises requests)."""
    config = uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def slow_engine(tmp_path, monkeypatch):
    """An engine whose media host answers only when ``release`` is set."""
    release, waiting = threading.Event(), []
    real = socket.getaddrinfo
    public = [(2, 1, 6, "", ("93.184.216.34", 80))]  # media.test, for any address check
    fake = lambda host, *a, **k: public if host == "media.test" else real(host, *a, **k)  # noqa: E731
    monkeypatch.setattr(socket, "getaddrinfo", fake)

    def media(request: httpx.Request) -> httpx.Response:
        waiting.append(request.url.path)
        release.wait(timeout=30)
        return httpx.Response(200, content=png_bytes(0, 32, 32))

    policy = MediaPolicy()
    settings = ServerSettings(tiny=True, data_dir=tmp_path / "data", media=policy)
    engine = Engine(settings, MediaFetcher(policy, httpx.MockTransport(media)))
    yield engine, release, waiting
    release.set()
    engine.close()


def test_webhooks_and_health_answer_while_predictions_wait_on_slow_media(slow_engine):
    engine, release, waiting = slow_engine
    with _live(engine) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = {"tasks": [_task(1, "http://media.test/slow.png")], "label_config": CONFIG}
        answers: list[httpx.Response] = []
        clients = [
            threading.Thread(target=lambda: answers.append(http.post("/predict", json=body)))
            for _ in range(8)
        ]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 30
        while len(waiting) < engine.settings.workers:  # every task worker is now blocked
            assert time.monotonic() < deadline, "the predictions never reached the media host"
            time.sleep(0.01)
        time.sleep(0.3)  # and the other requests are queued behind them
        event = {"action": "ANNOTATION_CREATED", "project": PROJECT, "annotation": {"id": 9}}
        latencies = {}
        try:
            for route, call in (
                ("webhook", lambda: http.post("/webhook", json=event, timeout=5)),
                ("health", lambda: http.get("/health", timeout=5)),
                ("setup", lambda: http.post("/setup", json={"schema": CONFIG}, timeout=5)),
            ):
                start = time.monotonic()
                assert call().status_code in (200, 201)
                latencies[route] = time.monotonic() - start
        finally:
            release.set()
        for client in clients:
            client.join(timeout=60)
    assert max(latencies.values()) < 1.0, latencies  # Label Studio's webhook timeout
    assert [a.status_code for a in answers] == [200] * 8
    assert all(len(a.json()["results"]) == 1 for a in answers)
    assert [e["annotation_ids"] for e in engine.events.all()] == [[9]]


def test_bodies_and_configs_are_parsed_off_the_event_loop(tmp_path, monkeypatch):
    """A 20,000-label /setup: its JSON and its config are parsed in the control pool, and
    /health answers meanwhile (a parse on the loop held it for seconds)."""
    import ovss_label.backend.server.app as app_module

    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path))
    threads: dict[str, str] = {}

    def recorded(name, real):
        def call(*args):
            threads[name] = threading.current_thread().name
            return real(*args)

        return call

    monkeypatch.setattr(app_module, "_parse", recorded("json", app_module._parse))
    monkeypatch.setattr(engine.projects, "get", recorded("config", engine.projects.get))
    huge = _config(20_000)
    with _live(engine) as url, httpx.Client(base_url=url, timeout=60) as http:
        setup = threading.Thread(target=lambda: http.post("/setup", json={"schema": huge}))
        setup.start()
        answered = 0
        while setup.is_alive():
            answered += http.get("/health").status_code == 200
        setup.join()
    assert threads["json"].startswith("ovss-control") and threads["config"].startswith(
        "ovss-control"
    )
    assert answered > 1  # /health kept answering while the config was parsed
    assert len(engine.projects.parsed) == 1  # the parse happened, and is kept
    engine.close()


class _CountingName(str):
    """A label name that counts equality tests (a quadratic check makes n² of them)."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        _CountingName.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__

    def strip(self, chars: str | None = None) -> _CountingName:
        return _CountingName(str.strip(self, chars))


def test_label_name_checks_are_linear():
    names = tuple(_CountingName(f"label {i}") for i in range(2_000))
    _CountingName.comparisons = 0
    Vocabulary(names, tuple((str(n),) for n in names), ("a photo of a {}.",))
    assert _CountingName.comparisons < 10 * len(names)  # n² would be 4,000,000
    with pytest.raises(ValueError, match=r"duplicate class names \['label 7'\]"):
        Vocabulary(("label 7", "x", " label 7"), (("a",), ("b",), ("c",)))


def test_the_parsed_config_cache_is_bounded_by_bytes():
    cache = ProjectCache("naclip", max_bytes=8 << 20)
    small = [CONFIG.replace("Dog", f"Dog {i}") for i in range(50)]
    for config in small:
        assert cache.get(config).vocabulary.names[1].startswith("Dog")
    assert len(cache.parsed) == 50 and cache.parsed.nbytes < 100_000
    big = _config(20_000)  # 0.55 MB of XML and 20,000 labels: costs its size, not one entry
    cache.get(big)
    one_big = cache.parsed.nbytes - sum(len(c) for c in small)
    assert 2 << 20 < one_big < 4 << 20
    for i in range(3):
        cache.get(big.replace("class 1", f"klass{i} 1"))
        assert cache.parsed.nbytes <= 8 << 20
    assert len(cache.parsed) == 2 and all(len(c) > 500_000 for c in cache.parsed._items)
    oversized = ProjectCache("naclip", max_bytes=1 << 20)
    assert len(oversized.get(big).vocabulary) == 20_000 and len(oversized.parsed) == 0


@pytest.fixture()
def client(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes(0, 40, 60))
    policy = MediaPolicy(local_root=root)
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "data", max_request_mb=1,
                                   media=policy))  # fmt: skip
    yield TestClient(create_app(engine)), engine
    engine.close()


def _with_text(text: object) -> dict:
    """A /predict body whose context is a TextArea region with ``value.text`` = ``text``."""
    context = {"result": [{"type": "textarea", "value": {"text": text}}]}
    return {"tasks": [_task(1, "/data/local-files/?d=a.png")], "label_config": CONFIG,
            "params": {"context": context}}  # fmt: skip


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("route", ["/setup", "/predict", "/webhook"])
@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{not json", "the body is not valid JSON: "),
        (b"", "the body is not valid JSON: "),
        (b"\xff\xfe\x00garbage", "the body is not valid JSON: "),
        (DEEP, "the JSON body is nested too deeply"),
        (b"[1, 2]", "the body must be a JSON object"),
        (b'"text"', "the body must be a JSON object"),
    ],
)
def test_malformed_bodies_get_400_with_one_line(client, route, body, detail):
    """One line: the parser's reason after a fixed start, or the whole fixed message."""
    http, _ = client
    response = http.post(route, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    message = response.json()["detail"]
    assert message.startswith(detail) if detail.endswith(": ") else message == detail
    assert "\n" not in message


@pytest.mark.parametrize("chunked", [False, True])
def test_bodies_over_the_limit_get_413(client, chunked):
    """``max_request_mb`` (1 here) is the largest body read, whether it declares its length or
    streams without one (chunked): one byte more is a 413 that says the limit."""
    http, _ = client
    for size, status in ((1 << 20, 400), ((1 << 20) + 1, 413)):  # at the limit: read, parsed
        body = b" " * size
        content = iter([body[: size // 2], body[size // 2 :]]) if chunked else body
        response = http.post("/predict", content=content)
        assert response.status_code == status, (size, response.text[:80])
    assert response.json()["detail"] == "the request body is over 1 MB"


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"tasks": {"id": 1}, "label_config": CONFIG}, "'tasks' must be a list"),
        ({"tasks": "all", "label_config": CONFIG}, "'tasks' must be a list"),
        ({"label_config": CONFIG}, "'tasks' must be a list"),
        ({"tasks": [], "label_config": 7}, "'label_config' must be a string"),
        (_with_text(42), "value.text must be a list of strings"),
        (_with_text([1]), "value.text must be a list of strings"),
        (_with_text({"a": 1}), "value.text must be a list of strings"),
    ],
)
def test_malformed_predict_requests_get_400(client, body, detail):
    http, _ = client
    response = http.post("/predict", json=body)
    assert response.status_code == 400 and detail in response.json()["detail"]


def test_odd_tasks_get_an_empty_prediction_each_and_the_batch_goes_on(client):
    http, engine = client
    tasks = [7, "task", None, {"id": 4, "data": "a.png"}, _task(5, "/data/local-files/?d=a.png")]
    response = http.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    results = response.json()["results"]
    assert response.status_code == 200 and len(results) == 5
    assert [r["result"] for r in results[:4]] == [[], [], [], []]
    assert results[4]["result"] and results[4]["model_version"] == engine.model_version("naclip")


def test_a_text_given_as_a_string_is_the_query(client, monkeypatch):
    http, engine = client
    seen = []
    real = engine.predict_task
    monkeypatch.setattr(
        engine,
        "predict_task",
        lambda t, p, label, *rest: seen.append((p, label)) or real(t, p, label, *rest),
    )
    response = http.post("/predict", json=_with_text(" kitten "))
    assert response.status_code == 200 and len(response.json()["results"]) == 1
    vocabulary, embedder = seen[0][0].vocabulary, engine.proposer("naclip").text_embedder()
    expected = label_for_text("kitten", engine.projects.get(CONFIG).vocabulary, embedder)
    assert [(vocabulary.synonyms, label) for _, label in seen] == [((("kitten",),), expected)]


@pytest.mark.parametrize(
    "payload",
    [
        {"action": "ANNOTATION_CREATED", "project": {"id": 2**70}, "task": {"id": -(2**70)},
         "annotation": {"id": 2**64}},
        {"action": "ANNOTATION_UPDATED", "project": {"id": "3"}, "task": [{"id": 1.5}, "x"],
         "annotation": {"id": True}},
        {"action": "ANNOTATIONS_CREATED", "project": [], "annotation": "everything"},
        {"action": "START_TRAINING", "project": None},
    ],
)  # fmt: skip
def test_every_webhook_is_stored_whatever_its_fields(client, tmp_path, payload):
    http, _ = client
    raw = json.dumps(payload)
    response = http.post("/webhook", content=raw)
    assert response.status_code == 201 and response.json()["status"] == "ok"
    # Read back through a fresh connection: the row is committed, the body verbatim.
    with sqlite3.connect(tmp_path / "data" / "events.sqlite") as db:
        rows = db.execute("SELECT action, project_id, task_ids, payload FROM events").fetchall()
    assert rows == [(payload["action"], None, "[]", raw)]


def test_a_webhook_keeps_the_ids_that_fit(client, tmp_path):
    http, _ = client
    payload = {"action": "ANNOTATIONS_CREATED", "project": {"id": 3},
               "annotation": [{"id": 5}, {"id": 2**70}, {"id": 6}]}  # fmt: skip
    assert http.post("/webhook", json=payload).status_code == 201
    with sqlite3.connect(tmp_path / "data" / "events.sqlite") as db:
        row = db.execute("SELECT project_id, annotation_ids FROM events").fetchone()
    assert row == (3, "[5, 6]")


def test_parse_project_reads_the_config_once(monkeypatch):
    import label_studio_sdk.label_interface.interface as sdk

    parses = []
    real = sdk.LabelInterface.__init__

    def counting(self, *args, **kwargs):
        parses.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(sdk.LabelInterface, "__init__", counting)
    project = parse_project(CONFIG, "naclip")
    assert project.vocabulary.names == ("Cat", "Dog") and len(parses) == 1


def test_setup_reports_the_weight_file_that_would_be_loaded(
    tmp_path, tiny_checkpoints, monkeypatch
):
    """Another file under the official name is another model_version, known before any model
    is loaded (Label Studio gives /setup 3 s)."""
    import shutil

    import ovss_label.backend.server.engine as engine_module

    monkeypatch.setattr(engine_module.ModelPool, "load", lambda *a, **k: pytest.fail("loaded"))
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("OVSS_WEIGHTS_DIR", str(weights))
    engine = Engine(ServerSettings(data_dir=tmp_path / "data"))
    http = TestClient(create_app(engine))
    published = http.post("/setup", json={"schema": CONFIG}).json()["model_version"]
    assert published == method_plan("naclip", tiny=False).identity.version  # the table's sha256
    shutil.copy(tiny_checkpoints["openai"], weights / "ViT-B-16.pt")  # not the published file
    other = http.post("/setup", json={"schema": CONFIG}).json()["model_version"]
    assert other.startswith("naclip·b16·") and other != published
    assert engine.model_version("naclip+sam") != engine.model_version("naclip")
    engine.close()


def test_answers_shown_in_the_editor_are_predictions_even_when_they_fail_for_now(
    client, monkeypatch
):
    """A TextArea query is answered to a user in the editor (Label Studio reads results[0]):
    a failure for now is an empty prediction there, and zero predictions in a batch."""
    from ovss_label.backend.server.media import MediaError

    http, engine = client

    def unavailable(*args, **kwargs):
        raise MediaError("the image host timed out", transient=True)

    monkeypatch.setattr(engine.media, "image", unavailable)
    live = http.post("/predict", json=_with_text("kitten")).json()["results"]
    assert live == [{"result": [], "score": 0.0, "model_version": engine.model_version("naclip")}]
    batch = {"tasks": [_task(1, "/data/local-files/?d=a.png")], "label_config": CONFIG}
    assert http.post("/predict", json=batch).json()["results"] == [[]]


def test_a_projects_ovss_min_score_drops_proposals_below_it(client, monkeypatch):
    import ovss_label.backend.server.engine as engine_module

    http, _ = client
    monkeypatch.setattr(engine_module, "propose", half_and_half)
    thresholded = CONFIG.replace('toName="image"', 'toName="image" ovss_min_score="0.3"')
    assert parse_project(thresholded, "naclip").min_score == 0.3
    assert parse_project(CONFIG, "naclip").min_score == 0.0
    labels = {}
    for name, config in (("plain", CONFIG), ("0.3", thresholded)):
        body = {"tasks": [_task(1, "/data/local-files/?d=a.png")], "label_config": config}
        regions = http.post("/predict", json=body).json()["results"][0]["result"]
        labels[name] = sorted(r["value"]["brushlabels"][0] for r in regions)
    assert labels == {"plain": ["Cat", "Dog"], "0.3": ["Cat"]}


@pytest.mark.parametrize("value", ["high", "1.5", "-0.1", "nan"])
def test_an_invalid_ovss_min_score_is_a_config_error(value):
    config = CONFIG.replace('toName="image"', f'toName="image" ovss_min_score="{value}"')
    with pytest.raises(ValueError, match=f'ovss_min_score="{value}" is not a number from 0 to 1'):
        parse_project(config, "naclip")
