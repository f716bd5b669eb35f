"""Task media downloads against real sockets: the address policy at every hop and against DNS
rebinding, the download budget, and which requests carry the Label Studio token."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from helpers import Host, png_bytes

from ovss_label.backend.server import MediaPolicy
from ovss_label.backend.server.media import MediaError, MediaFetcher


@pytest.fixture()
def hosts() -> Iterator[tuple[Host, Host]]:
    """(allowed, forbidden): 127.0.0.2 is in the allowed networks below, 127.0.0.1 is not."""
    allowed, forbidden = Host("127.0.0.2", 1), Host("127.0.0.1", 2)
    yield allowed, forbidden
    allowed.close()
    forbidden.close()


def _fetcher(**policy: object) -> MediaFetcher:
    return MediaFetcher(MediaPolicy(allowed_networks=("127.0.0.2/32",), **policy))  # type: ignore[arg-type]


def test_private_addresses_are_refused_unless_allowed(hosts):
    allowed, forbidden = hosts
    with pytest.raises(MediaError, match=r"non-public address 127\.0\.0\.1") as refused:
        _fetcher().download(forbidden.url + "/a.png")
    assert not refused.value.transient and forbidden.seen == []
    assert _fetcher().download(allowed.url + "/a.png") == allowed.body
    assert MediaFetcher(MediaPolicy(allow_private=True)).download(forbidden.url + "/a.png")


def test_every_redirect_hop_is_checked(hosts):
    allowed, forbidden = hosts
    with pytest.raises(MediaError, match=r"non-public address 127\.0\.0\.1"):
        _fetcher().download(f"{allowed.url}/to?url={forbidden.url}/a.png")
    assert allowed.seen == [f"/to?url={forbidden.url}/a.png"] and forbidden.seen == []
    again = _fetcher().download(f"{allowed.url}/to?url={allowed.url}/a.png")
    assert again == allowed.body  # an allowed hop is followed


def test_the_connection_goes_to_the_address_that_was_checked(hosts, monkeypatch):
    """DNS rebinding: the name answers an allowed address, then a forbidden one."""
    allowed, forbidden = hosts
    port = allowed.server.server_port
    forbidden_port = forbidden.server.server_port
    answers = iter(["127.0.0.2", "127.0.0.1", "127.0.0.1", "127.0.0.1"])
    real = socket.getaddrinfo

    def rebinding(host, port_, *args, **kwargs):
        if host == "rebind.test":
            address = next(answers)
            used_port = port if address == "127.0.0.2" else forbidden_port
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, used_port))]
        return real(host, port_, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    body = _fetcher().download(f"http://rebind.test:{port}/a.png")
    assert body == allowed.body and allowed.seen == ["/a.png"] and forbidden.seen == []


def test_a_trickling_server_meets_the_download_budget(hosts):
    allowed, _ = hosts
    start = time.monotonic()
    with pytest.raises(MediaError, match="download budget") as slow:
        _fetcher(download_timeout=1.0).download(allowed.url + "/trickle")
    assert slow.value.transient and time.monotonic() - start < 3.0


def _recording() -> tuple[list[httpx.Request], httpx.MockTransport]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=png_bytes(0))

    return seen, httpx.MockTransport(answer)


@pytest.mark.parametrize(
    "path",
    [
        "/data/upload/3/a.png",
        "/data/local-files/?d=photos/a.png",
        "/storage-data/uploaded/?filepath=upload/3/a.png",
        "/tasks/42/presign/?fileuri=czM6Ly9iL2EucG5n",
        "/tasks/42/resolve/?fileuri=czM6Ly9iL2EucG5n",
        "/projects/7/resolve/?fileuri=czM6Ly9iL2EucG5n",
    ],
)
def test_label_studio_media_paths_get_the_token(path):
    seen, transport = _recording()
    policy = MediaPolicy(ls_url="http://ls.test:8080/", ls_token="secret-token")
    MediaFetcher(policy, transport).image(path, task_id=42)
    (request,) = seen
    assert request.url.host == "ls.test" and request.url.port == 8080
    assert request.headers["authorization"] == "Token secret-token"


@pytest.mark.parametrize(
    "url",
    [
        "/api/current-user/whoami",
        "/api/projects/",
        "/data/upload/../../api/current-user/whoami",
        "/data/upload/%2e%2e/%2e%2e/api/current-user/whoami",
        "/tasks/42/presign/../../api/users/",
        "/data/upload/.",  # Label Studio's upload folder itself, not a file in it
        "/data/upload/%2e",
        "/data/upload/3/./a.png",
    ],
)
def test_other_label_studio_paths_are_refused_without_a_request(url):
    seen, transport = _recording()
    policy = MediaPolicy(ls_url="http://ls.test:8080", ls_token="secret-token")
    with pytest.raises(MediaError, match="not a Label Studio media path"):
        MediaFetcher(policy, transport).image(url)
    assert seen == []


@pytest.mark.parametrize(
    "url",
    [
        "http://ls.test:8080/api/current-user/whoami",  # Label Studio, not a media path
        "http://ls.test.evil.net:8080/data/upload/3/a.png",
        "https://ls.test:8080/data/upload/3/a.png",  # another scheme
        "http://ls.test:8081/data/upload/3/a.png",  # another port
        "http://evil.net/data/upload/3/a.png",
    ],
)
def test_the_token_goes_only_to_label_studio_media(url, monkeypatch):
    seen, transport = _recording()
    policy = MediaPolicy(ls_url="http://ls.test:8080", ls_token="secret-token")
    MediaFetcher(policy, transport).image(url)
    assert [r.headers.get("authorization") for r in seen] == [None]


def test_a_malformed_url_fails_for_good_without_a_request():
    seen, transport = _recording()
    policy = MediaPolicy(ls_url="http://ls.test:8080", ls_token="secret-token")
    with pytest.raises(MediaError, match="malformed URL") as malformed:
        MediaFetcher(policy, transport).image("http://ls.test:8080.evil.net/data/upload/3/a.png")
    assert seen == [] and not malformed.value.transient


def test_label_studio_under_a_sub_path():
    seen, transport = _recording()
    policy = MediaPolicy(ls_url="https://example.org/ls/", ls_token="secret-token")
    fetcher = MediaFetcher(policy, transport)
    fetcher.image("/data/upload/3/a.png")
    fetcher.image("https://example.org/data/upload/3/a.png")  # outside Label Studio's prefix
    assert str(seen[0].url) == "https://example.org/ls/data/upload/3/a.png"
    assert [r.headers.get("authorization") for r in seen] == ["Token secret-token", None]


def test_unchanging_images_are_decoded_once(tmp_path, monkeypatch):
    """Clicks on one task: a local file (until it changes) and a Label Studio upload are
    decoded once; any other URL is fetched every time (its content may change)."""
    import os

    import ovss_label.backend.server.media as media

    decodes = []
    for name in ("load_rgb", "decode_rgb"):
        real = getattr(media, name)
        monkeypatch.setattr(
            media, name, lambda *a, real=real, **k: decodes.append(1) or real(*a, **k)
        )
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    seen, transport = _recording()
    policy = MediaPolicy(ls_url="http://ls.test", ls_token="t", local_root=tmp_path)
    fetcher = MediaFetcher(policy, transport)
    first = fetcher.image("/data/local-files/?d=a.png")
    assert fetcher.image("/data/local-files/?d=a.png") is first and len(decodes) == 1
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0, 0] = 1  # shared between requests
    (tmp_path / "a.png").write_bytes(png_bytes(2))
    os.utime(tmp_path / "a.png", ns=(1, 1))  # a new version of the file
    assert not np.array_equal(fetcher.image("/data/local-files/?d=a.png"), first)
    for _ in range(2):
        fetcher.image("/data/upload/3/a.png")
        fetcher.image("http://media.test/a.png")
    assert [r.url.path for r in seen] == ["/data/upload/3/a.png", "/a.png", "/a.png"]
    assert len(decodes) == 5
