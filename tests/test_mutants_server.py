"""Server guarantees that mutation testing (``bench/mutation.py backend/server``) found untested.

Each test states a behaviour a user or operator relies on: the documented limits, how the
environment configures media, ...
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ovss_label.backend.server import MediaPolicy, ServerSettings
from ovss_label.backend.server.media import MediaFetcher

MEDIA_ENV = (
    "LABEL_STUDIO_URL",
    "LABEL_STUDIO_API_KEY",
    "OVSS_LOCAL_FILES_ROOT",
    "LOCAL_FILES_DOCUMENT_ROOT",
    "OVSS_ALLOW_PRIVATE_URLS",
    "OVSS_ALLOWED_NETWORKS",
    "OVSS_MAX_IMAGE_MB",
    "OVSS_DOWNLOAD_TIMEOUT",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in MEDIA_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_media_limits_default_to_the_readmes_numbers() -> None:
    # README, "Hardening": 5 s connect, 10 s between bytes, 20 s per download, 64 MB, 80 MP,
    # at most 3 redirects; private addresses refused; no token, no local files.
    policy = MediaPolicy()
    assert (policy.connect_timeout, policy.read_timeout, policy.download_timeout) == (5, 10, 20)
    assert policy.max_bytes == 64 * 1024 * 1024
    assert policy.max_pixels == 80_000_000
    assert policy.max_redirects == 3
    assert policy.decoded_cache_mb == 256
    assert (policy.ls_url, policy.ls_token, policy.local_root) == (None, None, None)
    assert policy.allow_private is False and policy.allowed_networks == ()
    assert "secret" not in repr(MediaPolicy(ls_token="secret"))


def test_server_defaults_are_the_documented_ones() -> None:
    # Values `serve` does not set from an option (README: a body over 100 MB gets 413) and the
    # defaults a library user gets.
    settings = ServerSettings()
    assert (settings.method, settings.sam_model, settings.device) == ("naclip", "sam_vit_b", "cpu")
    assert settings.tiny is False and settings.learn is False
    assert settings.data_dir == Path("ovss-data")
    assert (settings.workers, settings.cache_mb, settings.config_cache_mb) == (2, 1024, 32)
    assert settings.max_request_mb == 100
    assert (settings.train_every, settings.train_schedule, settings.train_options) == (10, None, ())
    assert (settings.job_lease_seconds, settings.max_training_jobs) == (120.0, 1)
    assert settings.basic_user is settings.basic_password is settings.webhook_token is None
    assert settings.fmbseg_head is None
    text = repr(ServerSettings(basic_password="pw-1", webhook_token="tok-2"))
    assert "pw-1" not in text and "tok-2" not in text


def test_media_policy_from_an_empty_environment_is_the_default(
    clean_env: pytest.MonkeyPatch,
) -> None:
    assert MediaPolicy.from_env() == MediaPolicy()
    for name in MEDIA_ENV:  # set but empty: unset
        clean_env.setenv(name, "")
    assert MediaPolicy.from_env() == MediaPolicy()


def test_media_policy_reads_every_variable(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("LABEL_STUDIO_URL", "http://ls:8080")
    clean_env.setenv("LABEL_STUDIO_API_KEY", "key-1")
    clean_env.setenv("OVSS_LOCAL_FILES_ROOT", str(tmp_path / "ovss"))
    clean_env.setenv("LOCAL_FILES_DOCUMENT_ROOT", str(tmp_path / "ls"))
    clean_env.setenv("OVSS_ALLOW_PRIVATE_URLS", "1")
    clean_env.setenv("OVSS_ALLOWED_NETWORKS", "10.1.2.0/24, 192.168.0.0/16,")
    clean_env.setenv("OVSS_MAX_IMAGE_MB", "8")
    clean_env.setenv("OVSS_DOWNLOAD_TIMEOUT", "7.5")
    policy = MediaPolicy.from_env()
    assert (policy.ls_url, policy.ls_token) == ("http://ls:8080", "key-1")
    assert policy.local_root == tmp_path / "ovss"  # ours wins over Label Studio's variable
    assert policy.allow_private is True
    assert policy.allowed_networks == ("10.1.2.0/24", "192.168.0.0/16")
    assert policy.max_bytes == 8 * 1024 * 1024
    assert policy.download_timeout == 7.5
    # Untouched by the environment:
    assert (policy.max_pixels, policy.max_redirects, policy.read_timeout) == (80_000_000, 3, 10)

    clean_env.delenv("OVSS_LOCAL_FILES_ROOT")  # Label Studio's own variable is the fallback
    assert MediaPolicy.from_env().local_root == tmp_path / "ls"


@pytest.mark.parametrize(
    ("value", "allowed"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True),
     ("0", False), ("false", False), ("no", False), ("off", False), ("2", False)],
)  # fmt: skip
def test_private_urls_are_allowed_only_by_a_yes(
    clean_env: pytest.MonkeyPatch, value: str, allowed: bool
) -> None:
    clean_env.setenv("OVSS_ALLOW_PRIVATE_URLS", value)
    assert MediaPolicy.from_env().allow_private is allowed


def _learning_settings(tmp_path: Path, **media: str | None) -> ServerSettings:
    from ovss_label.backend.learning.gate import GateConfig

    return ServerSettings(
        method="pnp_ovss", tiny=True, data_dir=tmp_path / "data", learn=True,
        train_every=4, train_schedule="nightly at 02:30", train_options=("--epochs", "2"),
        gate=GateConfig(min_held_out=3, margin=0.02), job_lease_seconds=45.0,
        max_training_jobs=2, media=MediaPolicy(**media), fmbseg_head=None,
    )  # fmt: skip


def test_serve_learn_builds_the_loop_from_every_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve --learn``: each option reaches the worker, the trigger policy and the loop."""
    from ovss_label import lsapi
    from ovss_label.backend.learning.gate import GateConfig
    from ovss_label.backend.server.learning import learning_loop
    from ovss_label.backend.store import events_path

    monkeypatch.setenv("OVSS_FMBSEG_HEAD", str(tmp_path / "env-head"))
    settings = _learning_settings(tmp_path, ls_url="http://ls:8080", ls_token="tok")
    loop = learning_loop(settings)
    worker = loop.settings
    assert (worker.data_dir, worker.ls_url, worker.api_key) == (
        tmp_path / "data",
        "http://ls:8080",
        "tok",
    )
    assert (worker.zero_shot, worker.tiny, worker.train_options) == (
        "pnp_ovss",
        True,
        ("--epochs", "2"),
    )
    assert worker.gate == GateConfig(min_held_out=3, margin=0.02)
    assert worker.zero_shot_head == str(tmp_path / "env-head")  # what Engine.plan uses
    assert (loop.policy.min_new_annotations, loop.policy.schedule) == (4, "nightly at 02:30")
    assert (loop.lease_seconds, loop.max_running) == (45.0, 2)
    assert loop.database == events_path(tmp_path / "data")

    made: list[tuple[str, str]] = []
    monkeypatch.setattr(lsapi, "make_client", lambda url, key: made.append((url, key)) or "client")
    assert loop.client_factory() == "client" and made == [("http://ls:8080", "tok")]

    with_head = learning_loop(ServerSettings(**{**settings.__dict__, "fmbseg_head": "run-7"}))
    assert with_head.settings.zero_shot_head == "run-7"  # the option wins over the variable


@pytest.mark.parametrize("media", [{"ls_url": "http://ls:8080"}, {"ls_token": "tok"}, {}])
def test_serve_learn_refuses_without_label_studio_url_and_key(
    tmp_path: Path, media: dict[str, str]
) -> None:
    from ovss_label.backend.server.learning import learning_loop

    with pytest.raises(ValueError, match="--learn needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        learning_loop(_learning_settings(tmp_path, **media))


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


def _failing_fetcher(exc: Exception) -> object:
    import httpx

    from ovss_label.backend.server.media import MediaFetcher

    def answer(request: httpx.Request) -> httpx.Response:
        raise exc

    return MediaFetcher(MediaPolicy(), httpx.MockTransport(answer))


def test_a_failed_download_says_what_failed_without_the_query_and_may_be_retried() -> None:
    """Every network failure is transient (the task is retried later, not marked failed for
    good); a blocked address is not. Messages name the URL without its signature."""
    import httpx

    from ovss_label.backend.server.media import MediaError
    from ovss_label.backend.server.netguard import BlockedAddressError, ResolveError

    url = "https://media.test/a.png?X-Amz-Signature=s3cr3t"
    unresolved = "cannot resolve media.test: no name"
    cases = [
        (httpx.ConnectError("refused"), "https://media.test/a.png failed: ConnectError", True),
        (httpx.ReadTimeout("slow"), "https://media.test/a.png timed out (ReadTimeout)", True),
        (ResolveError(unresolved), unresolved, True),
        (BlockedAddressError("non-public address 10.0.0.1"), "non-public address 10.0.0.1", False),
    ]  # fmt: skip
    for exc, message, transient in cases:
        with pytest.raises(MediaError) as failed:
            _failing_fetcher(exc).download(url)
        assert (str(failed.value), failed.value.transient) == (message, transient)


def test_a_failed_token_refresh_is_transient_and_does_not_show_the_token() -> None:
    from ovss_label.backend.server.media import MediaError, MediaFetcher

    class ExpiredSDK:  # the SDK's client: exchanging the refresh token fails
        class _client_wrapper:  # noqa: N801
            @staticmethod
            def get_headers() -> dict[str, str]:
                raise PermissionError("token eyJ.pat.sig expired")

    fetcher = MediaFetcher(MediaPolicy(ls_url="http://ls.test", ls_token="eyJ.pat.sig"))
    fetcher._sdk = ExpiredSDK()
    with pytest.raises(MediaError) as failed:
        fetcher._headers("http://ls.test/data/upload/1/a.png")
    assert str(failed.value) == "Label Studio token refresh failed: PermissionError"
    assert failed.value.transient is True


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


def test_an_ipv4_mapped_ipv6_address_is_judged_as_its_ipv4_address() -> None:
    import ipaddress

    from ovss_label.backend.server.netguard import AddressGuard

    guard = AddressGuard(allowed_networks=["10.1.2.0/24"])
    assert not guard.allowed(ipaddress.ip_address("::ffff:127.0.0.1"))  # loopback
    assert not guard.allowed(ipaddress.ip_address("::ffff:192.168.1.1"))
    assert guard.allowed(ipaddress.ip_address("::ffff:8.8.8.8"))  # public
    assert guard.allowed(ipaddress.ip_address("::ffff:10.1.2.3"))  # an allowed network


def test_label_studios_own_host_passes_whatever_its_address_and_case() -> None:
    from ovss_label.backend.server.netguard import AddressGuard, BlockedAddressError

    guard = AddressGuard(trusted=("LocalHost", 8080))
    for host in ("localhost", "LOCALHOST"):  # host names are case-insensitive
        assert guard.resolve(host, 8080)
    with pytest.raises(BlockedAddressError) as blocked:
        guard.resolve("localhost", 8081)  # another port is another service
    assert str(blocked.value).startswith("localhost resolves to the non-public address ")
    assert str(blocked.value).endswith(
        "; set OVSS_ALLOW_PRIVATE_URLS=1 or add its network to OVSS_ALLOWED_NETWORKS to allow it"
    )


def test_a_name_that_does_not_resolve_says_which_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from ovss_label.backend.server.netguard import AddressGuard, ResolveError

    def unknown(*args: object, **kwargs: object) -> object:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(ResolveError) as failed:
        AddressGuard().resolve("nowhere.test", 443)
    assert str(failed.value) == "cannot resolve nowhere.test: Name or service not known"


BRUSH_CLICKS = """<View><Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/><Label value="Dog"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Dog"/></RectangleLabels>
</View>"""
POLYGON_CLICKS = BRUSH_CLICKS.replace("BrushLabels", "PolygonLabels")


@pytest.fixture
def clicks_server(tmp_path: Path) -> tuple[object, object, object]:
    """(client, engine, image): a tiny server whose local file ``a.png`` is ``image``."""
    import io

    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from ovss_label.backend.server import Engine, create_app

    image = np.random.default_rng(4).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
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


def test_an_origin_is_scheme_host_and_port_with_the_schemes_default_port() -> None:
    from ovss_label.backend.server.media import origin

    assert origin("http://LS.Test/data/upload/1/a.png") == ("http", "ls.test", 80)
    assert origin("HTTPS://ls.test/x") == ("https", "ls.test", 443)
    assert origin("https://ls.test:8443/x") == ("https", "ls.test", 8443)
    assert origin("ftp://files.test/a.png") == ("ftp", "files.test", 0)  # no default port
    assert origin("/data/upload/1/a.png") is None  # no host
    assert origin("http://ls.test:99999/x") is None  # malformed port


@pytest.mark.parametrize(
    ("ls_url", "url"),
    [
        ("http://ls.test", "http://LS.TEST:80/data/upload/3/a.png"),
        ("https://ls.test:443/", "HTTPS://ls.test/data/upload/3/a.png"),
    ],
)
def test_the_token_goes_to_label_studios_origin_however_it_is_written(
    ls_url: str, url: str
) -> None:
    from ovss_label.backend.server.media import MediaFetcher

    fetcher = MediaFetcher(MediaPolicy(ls_url=ls_url, ls_token="secret-token"))
    assert fetcher._headers(url) == {"Authorization": "Token secret-token"}


def test_task_urls_that_cannot_be_fetched_say_why() -> None:
    from ovss_label.backend.server.media import MediaError, MediaFetcher

    bare = MediaFetcher(MediaPolicy())
    with pytest.raises(MediaError) as cloud:
        bare._absolute("s3://bucket/a.png", None)
    assert str(cloud.value) == "a cloud-storage URL needs the task id to be presigned"
    with pytest.raises(MediaError) as relative:
        bare._absolute("/data/upload/3/a.png?token=s3cr3t", 1)
    assert (
        str(relative.value) == "/data/upload/3/a.png is a Label Studio path: set LABEL_STUDIO_URL"
    )
    with pytest.raises(MediaError) as schemeless:  # protocol-relative: another host, no scheme
        bare._absolute("//evil.test/data/upload/3/a.png", 1)
    assert str(schemeless.value).startswith("unsupported URL '//evil.test/data/upload/3/a.png'")
    slashed = MediaFetcher(MediaPolicy(ls_url="http://ls.test/"))
    assert slashed._absolute("/data/upload/3/a.png", 1) == "http://ls.test/data/upload/3/a.png"


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


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pa@ss@media.test:8443/a.png?X-Amz-Signature=s3cr3t#f", "https://media.test:8443/a.png"),
        ("http://media.test/a.png", "http://media.test/a.png"),
        ("/data/upload/1/a.png?token=s3cr3t", "/data/upload/1/a.png"),
        ("//u:p@evil.test/a.png?sig=s3cr3t", "//evil.test/a.png"),  # protocol-relative
    ],
)  # fmt: skip
def test_a_url_in_a_message_has_no_user_info_query_or_fragment(url: str, shown: str) -> None:
    from ovss_label.backend.server.media import redact

    assert redact(url) == shown


def _hops(answer: Any, **policy: Any) -> MediaFetcher:
    import httpx

    return MediaFetcher(MediaPolicy(**policy), httpx.MockTransport(answer))


def test_exactly_max_redirects_are_followed_relative_locations_included() -> None:
    """``max_redirects`` = 3 follows three hops and refuses the fourth, naming the last URL."""
    import httpx

    from ovss_label.backend.server.media import MediaError

    def chain(request: httpx.Request) -> httpx.Response:
        hop = int(request.url.path.strip("/h") or 0)  # /h0 -> /h1 -> ... (relative locations)
        if hop == int(request.url.params["stop"]):
            return httpx.Response(200, content=b"image bytes")
        return httpx.Response(
            302, headers={"location": f"h{hop + 1}?stop={request.url.params['stop']}"}
        )

    fetcher = _hops(chain)
    assert fetcher.download("http://media.test/h0?stop=3") == b"image bytes"
    with pytest.raises(MediaError) as refused:
        fetcher.download("http://media.test/h0?stop=4")
    assert str(refused.value) == "more than 3 redirects from http://media.test/h4"
    assert not refused.value.transient

    def nowhere(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302)  # a redirect without a location: the same URL again

    with pytest.raises(
        MediaError, match=re.escape("more than 1 redirects from http://media.test/a.png")
    ):
        _hops(nowhere, max_redirects=1).download("http://media.test/a.png")


@pytest.mark.parametrize(
    ("status", "transient"),
    [(404, False), (410, False), (400, False), (429, True), (401, True), (500, True), (503, True)],
)
def test_an_http_error_may_be_retried_only_when_it_may_pass(status: int, transient: bool) -> None:
    import httpx

    from ovss_label.backend.server.media import MediaError

    with pytest.raises(MediaError) as failed:
        _hops(lambda request: httpx.Response(status)).download("http://media.test/a.png?sig=x")
    assert str(failed.value) == f"http://media.test/a.png answered HTTP {status}"
    assert failed.value.transient is transient


def test_a_body_that_breaks_off_is_a_transient_failure() -> None:
    import httpx

    from ovss_label.backend.server.media import MediaError

    class Broken(httpx.SyncByteStream):
        def __iter__(self) -> Any:
            yield b"\x89PNG"
            raise httpx.RemoteProtocolError("peer closed connection")

    with pytest.raises(MediaError) as failed:
        _hops(lambda request: httpx.Response(200, stream=Broken())).download(
            "http://media.test/a.png?sig=x"
        )
    assert str(failed.value) == "http://media.test/a.png failed: RemoteProtocolError"
    assert failed.value.transient is True


def test_the_download_budget_covers_every_hop() -> None:
    import time

    import httpx

    from ovss_label.backend.server.media import MediaError

    def slow_redirect(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/a.png":
            time.sleep(0.3)
            return httpx.Response(302, headers={"location": "/b.png"})
        return httpx.Response(200, content=b"image bytes")

    assert _hops(slow_redirect, download_timeout=0.9).download("http://media.test/a.png")
    with pytest.raises(MediaError) as late:
        _hops(slow_redirect, download_timeout=0.2).download("http://media.test/a.png")
    assert str(late.value) == (
        "http://media.test/b.png took longer than the 0.2 s download budget (OVSS_DOWNLOAD_TIMEOUT)"
    )
    assert late.value.transient is True


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
    _png_file(tmp_path / "a.png")
    policy = MediaPolicy(local_root=tmp_path)
    busy = httpx.MockTransport(lambda request: httpx.Response(503))
    engine = Engine(ServerSettings(tiny=True, data_dir=tmp_path / "data", media=policy),
                    MediaFetcher(policy, busy))  # fmt: skip
    version = engine.model_version("naclip")
    urls = {1: "/data/local-files/?d=a.png", 2: "/data/local-files/?d=a.png",
            3: "/data/local-files/?d=broken.jpg", 4: "http://media.test/busy.png"}  # fmt: skip
    tasks = [LseTask.model_construct(id=i, data={"image": u}) for i, u in urls.items()]
    calls: dict[str, list[Any]] = {"get": [], "list": [], "tasks": [], "create": [], "with": []}
    earlier = [SimpleNamespace(task=1, model_version=version), SimpleNamespace(task=2),
               SimpleNamespace(task=3, model_version="naclip·older")]  # fmt: skip
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
    assert calls["with"] == [3, 3, 3]
    assert [p["task"] for p in calls["create"]] == [2, 3]
    good, broken = calls["create"]
    assert good["result"] and good["model_version"] == broken["model_version"] == version
    assert 0 < good["score"] <= 1 and broken["result"] == [] and broken["score"] == 0.0
    assert (report.job, report.model_version) == ("predict --project 3", version)
    assert (report.done, report.skipped, report.retry, report.counts) == (2, 1, 1, {"empty": 1})
    assert progress.seen == [("total", 4)] + [("advance", f"task {i}") for i in urls]


class Recording:
    """A ``jobs.Progress`` that records its calls."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def total(self, count: int | None) -> None:
        self.seen.append(("total", count))

    def advance(self, item: str = "") -> None:
        self.seen.append(("advance", item))


def _png_file(path: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(4).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _listening(address: str) -> Any:
    import socket

    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((address, 0))
    server.listen(4)
    return server


def test_a_pinned_connection_tries_each_checked_address_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first address refuses: the next one is tried; none accepts: the last error says
    why. Only stream (TCP) entries are resolved, and the connect timeout reaches the socket."""
    import socket

    import httpcore

    from ovss_label.backend.server.netguard import AddressGuard, PinnedBackend

    server = _listening("127.0.0.2")
    port = server.getsockname()[1]
    closed = ("127.0.0.3", port)  # nothing listens there: refused at once
    guard = AddressGuard(allow_private=True)
    assert {info[1] for info in guard.resolve("localhost", port)} == {socket.SOCK_STREAM}
    entries = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", a) for a in (closed, ("127.0.0.2", port))
    ]
    monkeypatch.setattr(guard, "resolve", lambda host, port: entries)
    timeouts = []
    real_settimeout = socket.socket.settimeout

    class Recorded(socket.socket):
        def settimeout(self, value: float | None) -> None:
            timeouts.append(value)
            real_settimeout(self, value)

    monkeypatch.setattr(socket, "socket", Recorded)
    try:
        stream = PinnedBackend(guard).connect_tcp("media.test", port, timeout=2.5)
        assert stream.get_extra_info("socket").getpeername() == ("127.0.0.2", port)
        stream.close()
        assert timeouts[:2] == [2.5, 2.5]
        monkeypatch.setattr(guard, "resolve", lambda host, port: entries[:1])
        with pytest.raises(httpcore.ConnectError, match="Connection refused"):
            PinnedBackend(guard).connect_tcp("media.test", port, timeout=2.5)
        monkeypatch.setattr(guard, "resolve", lambda host, port: [])
        with pytest.raises(httpcore.ConnectError, match=r"^no address for media\.test$"):
            PinnedBackend(guard).connect_tcp("media.test", port, timeout=2.5)
    finally:
        server.close()


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

    _png_file(tmp_path / "a.png")
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


@pytest.mark.parametrize("url", ["", None, 5, ["a.png"]])
def test_a_task_without_an_image_url_says_so(url: object) -> None:
    from ovss_label.backend.server.media import MediaError

    with pytest.raises(MediaError) as missing:
        MediaFetcher(MediaPolicy()).image(url)
    assert str(missing.value) == "the task has no image URL"


def test_a_local_file_meets_the_pixel_cap_too(tmp_path: Path) -> None:
    _png_file(tmp_path / "a.png")  # 40 x 60 = 2,400 px
    url = "/data/local-files/?d=a.png"
    assert MediaFetcher(MediaPolicy(local_root=tmp_path, max_pixels=2400)).image(url).shape == (
        40,
        60,
        3,
    )
    with pytest.raises(ValueError, match="60x40 px is more than the 2,399 px limit"):
        MediaFetcher(MediaPolicy(local_root=tmp_path, max_pixels=2399)).image(url)


def test_a_cloud_image_is_presigned_for_its_task() -> None:
    import base64

    import httpx

    seen = []

    def label_studio(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.url.params["fileuri"]))
        return httpx.Response(404)

    fetcher = _hops(label_studio, ls_url="http://ls.test", ls_token="secret-token")
    with pytest.raises(ValueError):
        fetcher.image("s3://bucket/a.png", task_id=42)
    encoded = base64.urlsafe_b64encode(b"s3://bucket/a.png").decode()
    assert seen == [("/tasks/42/presign/", encoded)]  # the task's own presign route


def test_only_label_studio_uploads_are_cached_by_url_and_a_bad_image_names_its_url() -> None:
    """An upload never changes under its URL, so a second request (a click) reuses its
    decoded image; another host's URL with the same path may change, so it is fetched again."""
    import io

    import httpx
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buffer, format="PNG")
    seen = []

    def host(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path.endswith("bad.png"):
            return httpx.Response(200, content=b"<html>no image</html>")
        return httpx.Response(200, content=buffer.getvalue())

    fetcher = _hops(host, ls_url="http://ls.test", ls_token="secret-token")
    for url in ["/data/upload/1/a.png"] * 2 + ["http://media.test/data/upload/1/a.png"] * 2:
        assert fetcher.image(url, task_id=1).shape == (4, 6, 3)
    assert (
        seen
        == ["http://ls.test/data/upload/1/a.png"] + ["http://media.test/data/upload/1/a.png"] * 2
    )
    with pytest.raises(ValueError, match=r"^cannot read image http://media\.test/bad\.png: "):
        fetcher.image("http://media.test/bad.png?sig=s3cr3t")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/data/local-files/?x=1", "local file '' is outside the configured root"),
        ("/data/local-files/?d=", "local file '' is outside the configured root"),
        ("/data/local-files/?d=../secret.png",
         "local file '../secret.png' is outside the configured root"),
        ("/data/local-files/?d=nope.png", "local file 'nope.png' does not exist under the root"),
    ],
)  # fmt: skip
def test_local_files_outside_the_root_or_missing_say_which(
    tmp_path: Path, url: str, message: str
) -> None:
    from ovss_label.backend.server.media import MediaError

    root = tmp_path / "root"
    root.mkdir()
    _png_file(tmp_path / "secret.png")
    with pytest.raises(MediaError) as refused:
        MediaFetcher(MediaPolicy(local_root=root)).image(url)
    assert str(refused.value) == message


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
