"""The ML-backend protocol with a test client and payloads shaped like Label Studio 1.23's."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.label_interface.interface import LabelInterface
from PIL import Image

from ovss_label.backend.server import Engine, MediaPolicy, ServerSettings, create_app
from ovss_label.backend.server.media import MediaFetcher

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Cat" predicted_values="cat, kitten"/><Label value="Dog"/>
  </BrushLabels>
  <PolygonLabels name="outline" toName="image">
    <Label value="Cat"/><Label value="Dog"/>
  </PolygonLabels>
</View>"""


def _png(h=40, w=60, seed=0) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _label_studio(request: httpx.Request) -> httpx.Response:
    """A fake Label Studio/media host for the fetcher (no network)."""
    if request.url.host == "ls.test" and request.url.path.startswith("/data/upload/"):
        if request.headers.get("authorization") != "Token secret-token":
            return httpx.Response(401)
        return httpx.Response(200, content=_png(seed=1))
    if request.url.host == "media.test" and request.url.path == "/redirect":
        return httpx.Response(302, headers={"location": "http://ls.test/data/upload/1/a.png"})
    return httpx.Response(404)


@pytest.fixture()
def server(tmp_path, monkeypatch):
    root = tmp_path / "files"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "a.png").write_bytes(_png())
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    policy = MediaPolicy(ls_url="http://ls.test", ls_token="secret-token", local_root=root)
    # The fake hosts resolve nowhere; treat them as public so the private-address check passes.
    monkeypatch.setattr(
        "socket.getaddrinfo", lambda host, *a, **k: [(2, 1, 6, "", ("93.184.216.34", 80))]
    )
    settings = ServerSettings(tiny=True, data_dir=tmp_path / "data", media=policy)
    engine = Engine(settings, MediaFetcher(policy, httpx.MockTransport(_label_studio)))
    return TestClient(create_app(engine)), engine


def _task(task_id, url):
    return {"id": task_id, "data": {"image": url}, "annotations": [], "predictions": [], "meta": {},
            "created_at": "2026-11-21T10:00:00Z", "updated_at": "2026-11-21T10:00:00Z",
            "is_labeled": False, "overlap": 1, "inner_id": task_id, "total_annotations": 0,
            "cancelled_annotations": 0, "total_predictions": 0, "project": 3,
            "file_upload": None}  # fmt: skip


def _predict_body(tasks):
    return {"tasks": tasks, "project": "3.1763719200", "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": None}}  # fmt: skip


def test_health_and_setup_report_the_version_predictions_carry(server):
    client, engine = server
    assert client.get("/health").json()["status"] == "UP"
    assert client.get("/").status_code == 200
    setup_body = {"project": "3.1763719200", "schema": CONFIG, "hostname": "http://ls.test",
                  "access_token": "x"}  # fmt: skip
    setup = client.post("/setup", json=setup_body)
    version = setup.json()["model_version"]
    assert version == engine.model_version("naclip") and "tiny" in version
    body = client.post(
        "/predict", json=_predict_body([_task(1, "/data/local-files/?d=photos/a.png")])
    )
    prediction = body.json()["results"][0]
    assert prediction["model_version"] == version
    assert client.get("/versions").json()["versions"][0] == version


def test_one_prediction_per_task_in_order_and_failures_stay_local(server):
    client, _ = server
    tasks = [
        _task(11, "/data/local-files/?d=photos/a.png"),
        _task(12, "/data/local-files/?d=photos/broken.jpg"),  # corrupt
        _task(13, "/data/upload/3/b.png"),  # Label Studio upload, with the token
        _task(14, "http://media.test/missing.png"),  # 404
        _task(15, "/data/local-files/?d=../../etc/passwd"),  # outside the root
        _task(16, "http://media.test/redirect"),  # redirected to Label Studio
        {"id": 17, "data": {}},  # no image
    ]
    response = client.post("/predict", json=_predict_body(tasks))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(tasks)
    interface = LabelInterface(CONFIG)
    for task, prediction in zip(tasks, results, strict=True):
        assert interface.validate_prediction(prediction), task["id"]
    ok = [bool(p["result"]) for p in results]
    assert ok == [True, False, True, False, False, True, False]
    for prediction in results[:1]:
        types = {r["type"] for r in prediction["result"]}
        assert types == {"brushlabels", "polygonlabels"}
        assert {r["from_name"] for r in prediction["result"]} == {"tag", "outline"}
    assert client.get("/health").json()["status"] == "UP"  # still healthy


def test_token_goes_only_to_label_studio(server):
    _, engine = server
    assert engine.media._headers("http://ls.test/data/upload/1/a.png") == {
        "Authorization": "Token secret-token"
    }
    assert engine.media._headers("http://media.test/a.png") == {}
    jwt = MediaFetcher(MediaPolicy(ls_url="http://ls.test", ls_token="a.b.c"))

    class RefreshingSDK:  # stands in for the SDK client: it exchanges the PAT for an access token
        class _client_wrapper:  # noqa: N801
            @staticmethod
            def get_headers():
                return {"Authorization": "Bearer access-123"}

    jwt._sdk = RefreshingSDK()
    media = "/data/upload/1/x.png"
    assert jwt._headers("http://ls.test" + media) == {"Authorization": "Bearer access-123"}
    assert jwt._headers("http://media.test" + media) == {}
    # Three dots but not a JWT: the SDK itself falls back to a legacy token.
    odd = MediaFetcher(MediaPolicy(ls_url="http://ls.test", ls_token="not.a.jwt"))
    assert odd._headers("http://ls.test" + media) == {"Authorization": "Token not.a.jwt"}


@pytest.mark.parametrize("declared", [True, False])
def test_byte_and_pixel_caps_are_exact(declared):
    """The caps hold at the byte and the pixel: one more is refused, the limit itself passes
    (with and without a Content-Length header)."""
    body = _png()  # 40 x 60 px

    def answer(request: httpx.Request) -> httpx.Response:
        if declared:
            return httpx.Response(200, content=body)
        return httpx.Response(200, content=iter([body[:100], body[100:]]))  # streamed

    transport = httpx.MockTransport(answer)
    url = "http://media.test/a.png"
    with pytest.raises(ValueError, match="byte limit"):
        MediaFetcher(MediaPolicy(max_bytes=len(body) - 1), transport).image(url)
    assert MediaFetcher(MediaPolicy(max_bytes=len(body)), transport).image(url).shape == (40, 60, 3)
    with pytest.raises(ValueError, match="px limit"):
        MediaFetcher(MediaPolicy(max_pixels=40 * 60 - 1), transport).image(url)
    assert MediaFetcher(MediaPolicy(max_pixels=40 * 60), transport).image(url).shape == (40, 60, 3)


def test_predictions_carry_the_projects_method_in_their_version(server):
    """A project whose control picks another method: /setup and every prediction agree on that
    method's model_version, not the server default's."""
    client, engine = server
    config = CONFIG.replace('name="tag" toName="image"', 'name="tag" toName="image" '
                            'ovss_method="naclip+sam"')  # fmt: skip
    version = client.post("/setup", json={"schema": config}).json()["model_version"]
    body = _predict_body([_task(1, "/data/local-files/?d=photos/a.png")])
    body["label_config"] = config
    prediction = client.post("/predict", json=body).json()["results"][0]
    assert version == engine.model_version("naclip+sam") != engine.model_version("naclip")
    assert prediction["model_version"] == version and prediction["result"]


def test_cloud_urls_go_through_the_presign_endpoint(server):
    _, engine = server
    url = engine.media._absolute("s3://bucket/photo.jpg", 42)
    encoded = base64.urlsafe_b64encode(b"s3://bucket/photo.jpg").decode()
    assert url == f"http://ls.test/tasks/42/presign/?fileuri={encoded}"


def test_a_config_without_brush_or_polygon_stores_nothing(server):
    client, _ = server
    body = _predict_body([_task(1, "/data/local-files/?d=photos/a.png")])
    body["label_config"] = (
        '<View><Image name="image" value="$image"/>'
        '<Choices name="c" toName="image"><Choice value="x"/></Choices></View>'
    )
    results = client.post("/predict", json=body).json()["results"]
    # Zero predictions for the task: Label Studio stores nothing and asks again once the
    # config has a BrushLabels or PolygonLabels control.
    assert results == [[]]


def test_webhooks_are_recorded_and_answered_at_once(server):
    client, engine = server
    project = {"id": 3, "title": "p", "label_config": CONFIG, "created_at": "2026-11-21T10:00:00Z"}
    created = {"action": "ANNOTATION_CREATED", "project": project, "task": {"id": 11},
               "annotation": {"id": 501, "result": []}}  # fmt: skip
    bulk = {"action": "ANNOTATIONS_CREATED", "project": project,
            "annotation": [{"id": 502}, {"id": 503}]}  # fmt: skip
    deleted = {"action": "ANNOTATIONS_DELETED", "project": project, "annotations": [{"id": 501}]}
    training = {"action": "START_TRAINING", "project": project}
    answers = []
    for payload in (created, bulk, deleted, training):
        response = client.post("/webhook", json=payload)
        assert response.status_code == 201
        answers.append(response.json())
    other = client.post("/webhook", json={"action": "TASKS_CREATED", "project": project})
    assert other.status_code == 200 and other.json()["status"] == "Unknown event"
    events = engine.events.all()
    assert [e["action"] for e in events] == ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED",
                                             "ANNOTATIONS_DELETED", "START_TRAINING"]  # fmt: skip
    assert events[0]["annotation_ids"] == [501] and events[0]["task_ids"] == [11]
    assert events[1]["annotation_ids"] == [502, 503] and events[2]["annotation_ids"] == [501]
    assert all(e["project_id"] == 3 for e in events)
    assert json.loads(events[3]["payload"])["action"] == "START_TRAINING"
    assert answers == [{"status": "ok", "result": {"event": e["id"]}} for e in events]


def test_basic_auth_everywhere_and_the_webhook_token(tmp_path):
    settings = ServerSettings(tiny=True, data_dir=tmp_path, basic_user="ls", basic_password="pw",
                              webhook_token="hook")  # fmt: skip
    client = TestClient(create_app(Engine(settings)))
    assert client.get("/health").status_code == 401
    assert client.get("/health", auth=("ls", "wrong")).status_code == 401
    assert client.get("/health", auth=("ls", "pw")).status_code == 200
    event = {"action": "START_TRAINING", "project": {"id": 1}}
    assert client.post("/webhook", json=event).status_code == 401
    assert client.post("/webhook?token=nope", json=event).status_code == 401
    assert client.post("/webhook?token=hook", json=event).status_code == 201
    assert client.post("/predict?token=hook", json={"tasks": []}).status_code == 401


def test_no_secrets_in_logs(server, caplog):
    client, _ = server
    caplog.set_level("DEBUG")
    tasks = [_task(1, "http://media.test/missing.png?X-Amz-Signature=topsecret")]
    client.post(
        "/predict", json=_predict_body(tasks), headers={"Authorization": "Token secret-token"}
    )
    text = caplog.text
    assert "topsecret" not in text and "secret-token" not in text
    assert "task 1: no prediction" in text


INTERACTIVE = CONFIG.replace(
    "</View>",
    '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/></KeyPointLabels>'
    '<RectangleLabels name="box" toName="image" smart="true"><Label value="Dog"/>'
    "</RectangleLabels></View>",
)


def _click(kind, value, positive=True):
    return {"type": kind, "value": value, "original_width": 60, "original_height": 40,
            "image_rotation": 0, "from_name": "kp", "to_name": "image",
            "is_positive": positive}  # fmt: skip


def test_smart_keypoints_and_rectangles_give_one_sam_mask(server):
    from ovss_label.backend.server.interactive import click_prompt

    client, _ = server
    context = {"result": [
        _click("keypointlabels", {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Cat"]}),
        _click("keypointlabels", {"x": 10, "y": 10, "width": 1, "keypointlabels": ["Cat"]}, False),
    ]}  # fmt: skip
    prompt = click_prompt(context, 40, 60)
    np.testing.assert_allclose(prompt.points, [[30, 20], [6, 4]])
    assert prompt.point_labels.tolist() == [1, 0] and prompt.label == "Cat" and prompt.box is None
    body = _predict_body([_task(1, "/data/local-files/?d=photos/a.png")])
    body["label_config"], body["params"]["context"] = INTERACTIVE, context
    results = client.post("/predict", json=body).json()["results"]
    assert len(results) == 1 and len(results[0]["result"]) == 1
    region = results[0]["result"][0]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Cat"]
    assert LabelInterface(INTERACTIVE).validate_prediction(results[0])
    value = {"x": 10, "y": 20, "width": 50, "height": 40, "rotation": 0, "rectanglelabels": ["Dog"]}
    box = {"result": [_click("rectanglelabels", value)]}
    boxed = click_prompt(box, 40, 60)
    np.testing.assert_allclose(boxed.box, [6, 8, 36, 24])
    body["params"]["context"] = box
    region = client.post("/predict", json=body).json()["results"][0]["result"][0]
    assert region["value"]["brushlabels"] == ["Dog"]
    unknown = {
        "result": [_click("keypointlabels", {"x": 50, "y": 50, "keypointlabels": ["Giraffe"]})]
    }
    body["params"]["context"] = unknown
    answer = client.post("/predict", json=body).json()["results"][0]
    assert answer["result"][0]["value"]["brushlabels"] == ["Cat"]  # never an unknown label
    assert LabelInterface(INTERACTIVE).validate_prediction(answer)


def _bad_media(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if path == "/truncated.png":
        return httpx.Response(200, content=_png()[:200])
    if path == "/text.png":
        return httpx.Response(200, content=b"<html>not an image</html>")
    if path == "/tiny.png":
        return httpx.Response(200, content=_png(1, 1))
    if path == "/slow.png":
        raise httpx.ReadTimeout("the server is slow", request=request)
    if path == "/busy.png":
        return httpx.Response(503)
    if path == "/huge.png":
        return httpx.Response(200, content=b"x" * 2048, headers={"content-length": str(1 << 40)})
    if path == "/bomb.png":
        import io

        buffer = io.BytesIO()
        Image.new("1", (12_000, 8_000)).save(buffer, format="PNG")  # 96 MP in ~12 kB
        return httpx.Response(200, content=buffer.getvalue())
    return httpx.Response(404)


@pytest.mark.parametrize(
    ("url", "reason", "transient"),
    [
        ("/data/local-files/?d=photos/broken.jpg", "cannot read image", False),
        ("http://media.test/truncated.png", "cannot read image", False),
        ("http://media.test/text.png", "cannot read image", False),
        ("http://media.test/bomb.png", "px limit", False),
        ("http://media.test/missing.png", "HTTP 404", False),
        ("http://media.test/slow.png", "timed out", True),
        ("http://media.test/busy.png", "HTTP 503", True),
        ("http://media.test/huge.png", "byte limit", False),
        ("ftp://media.test/a.png", "unsupported URL", False),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_inputs_fail_their_task_with_a_reason(
    tmp_path, monkeypatch, caplog, url, reason, transient
):
    root = tmp_path / "files"
    (root / "photos").mkdir(parents=True)
    (root / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    monkeypatch.setattr(
        "socket.getaddrinfo", lambda h, *a, **k: [(2, 1, 6, "", ("93.184.216.34", 80))]
    )
    policy = MediaPolicy(local_root=root)
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "d", media=policy),
                    MediaFetcher(policy, httpx.MockTransport(_bad_media)))  # fmt: skip
    client = TestClient(create_app(engine))
    caplog.set_level("WARNING")
    tasks = [_task(1, url), _task(2, "http://media.test/tiny.png")]
    response = client.post("/predict", json=_predict_body(tasks))
    assert response.status_code == 200
    first, second = response.json()["results"]
    if transient:  # zero predictions: Label Studio stores nothing and asks again next time
        assert first == []
        told = "task 1: no prediction now, to be retried: "
    else:  # an empty prediction: stored, never asked again
        assert first["result"] == [] and first["model_version"] == engine.model_version("naclip")
        told = "task 1: no prediction: "
    assert [m for m in caplog.messages if m.startswith(told) and reason in m], told
    assert "task 2" not in caplog.text  # a 1x1 image is answered, not failed
    assert LabelInterface(CONFIG).validate_prediction(second)
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "config",
    [
        '<View><BrushLabels name="b" toName="image"><Label value="x"/></BrushLabels></View>',
        '<View><Image name="image" value="$image"/></View>',
        "<View><Image",  # not XML
        "",
    ],
)
def test_unusable_label_configs_store_nothing(server, config):
    client, _ = server
    body = _predict_body([_task(1, "/data/local-files/?d=photos/a.png")])
    body["label_config"] = config
    response = client.post("/predict", json=body)
    assert response.status_code == 200 and response.json()["results"] == [[]]
    assert client.post("/setup", json={"schema": config}).status_code == 200


def test_basic_auth_refuses_malformed_credentials_and_keeps_colons_in_passwords(tmp_path):
    """A header that does not decode (bad base64, not UTF-8, no colon) is refused, never let
    through; the password is everything after the first colon (RFC 7617); a user set without a
    password accepts only the empty one."""
    import base64

    def basic(raw: bytes) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}

    settings = ServerSettings(tiny=True, data_dir=tmp_path, basic_user="ls", basic_password="p:w")
    engine = Engine(settings)
    client = TestClient(create_app(engine))
    for headers in ({"Authorization": "Basic !!not-base64!!"}, basic(b"\xff\xfe:\xff"),
                    basic(b"ls"), basic(b"ls:p"), basic(b"ls:p:w:")):  # fmt: skip
        assert client.get("/health", headers=headers).status_code == 401, headers
    assert client.get("/health", headers=basic(b"ls:p:w")).status_code == 200
    no_password = ServerSettings(tiny=True, data_dir=tmp_path / "b", basic_user="ls")
    other = Engine(no_password)
    client = TestClient(create_app(other))
    assert client.get("/health", headers=basic(b"ls:XXXX")).status_code == 401
    assert client.get("/health", headers=basic(b"ls:")).status_code == 200
    engine.close()
    other.close()


def test_a_method_without_a_version_is_logged_with_the_reason(tmp_path, caplog):
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path))
    caplog.set_level("WARNING")
    assert engine.model_version("naclip_nope") == "naclip_nope·unavailable"
    assert caplog.messages == [
        "naclip_nope: no model version: unknown method 'naclip_nope'; available: clip_sam, "
        "fmbseg, fmbseg+sam, naclip, naclip+sam, pnp_ovss, pnp_ovss+sam"
    ]
    engine.close()
