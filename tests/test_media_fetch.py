"""Task media as the server fetches it: each failure's message and retry flag, redirects, the
download budget, origins and the token, URL redaction, local files, caching, and the address
guard's connections (IPv4-mapped addresses, Label Studio's own host, each address in turn).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from helpers import png_bytes

from ovss_label.backend.server import MediaPolicy
from ovss_label.backend.server.media import MediaFetcher


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


def test_httpx_does_not_log_the_urls_it_fetches(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx logs each request's URL at INFO; a presigned URL's query holds credentials, so
    the media client keeps httpx's logger at WARNING, whatever the root logger's level."""
    import logging

    monkeypatch.setattr(logging.getLogger("httpx"), "level", logging.NOTSET)
    MediaFetcher(MediaPolicy())
    assert logging.getLogger("httpx").level == logging.WARNING


def test_an_allowed_network_may_be_written_with_host_bits_set() -> None:
    """``10.1.2.3/24`` means the network 10.1.2.0/24, as in firewall rules (not an error)."""
    import ipaddress

    from ovss_label.backend.server.netguard import AddressGuard

    guard = AddressGuard(allowed_networks=[" 10.1.2.3/24 ", ""])
    assert guard.allowed(ipaddress.ip_address("10.1.2.200"))
    assert not guard.allowed(ipaddress.ip_address("10.1.3.1"))


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
    # Label Studio under a path prefix: the prefix is kept whole, whatever its last letter
    prefixed = MediaFetcher(MediaPolicy(ls_url="http://ls.test/labelX/"))
    assert prefixed._absolute("/data/upload/3/a.png", 1) == (
        "http://ls.test/labelX/data/upload/3/a.png"
    )
    assert prefixed.ls_prefix == "/labelX"


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
        # a timeout ends the attempt at once (no next address) and says what timed out
        monkeypatch.setattr(guard, "resolve", lambda host, port: entries[1:] * 2)

        def slow(self: socket.socket, address: object) -> None:
            raise TimeoutError(f"connecting to {address} timed out")

        monkeypatch.setattr(Recorded, "connect", slow)
        with pytest.raises(httpcore.ConnectTimeout) as late:
            PinnedBackend(guard).connect_tcp("media.test", port, timeout=2.5)
        assert str(late.value) == f"connecting to ('127.0.0.2', {port}) timed out"
    finally:
        server.close()


@pytest.mark.parametrize("url", ["", None, 5, ["a.png"]])
def test_a_task_without_an_image_url_says_so(url: object) -> None:
    from ovss_label.backend.server.media import MediaError

    with pytest.raises(MediaError) as missing:
        MediaFetcher(MediaPolicy()).image(url)
    assert str(missing.value) == "the task has no image URL"


def test_a_local_file_meets_the_pixel_cap_too(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(4, 40, 60))  # 40 x 60 = 2,400 px
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
    import httpx

    seen = []

    def host(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path.endswith("bad.png"):
            return httpx.Response(200, content=b"<html>no image</html>")
        return httpx.Response(200, content=png_bytes(0, 4, 6))

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
    (tmp_path / "secret.png").write_bytes(png_bytes(4, 40, 60))
    with pytest.raises(MediaError) as refused:
        MediaFetcher(MediaPolicy(local_root=root)).image(url)
    assert str(refused.value) == message


def test_the_pinned_transport_keeps_httpxs_pool_settings() -> None:
    """The pool swapped in for ``PinnedBackend`` has httpx's own limits (or the ones given)."""
    import httpx

    from ovss_label.backend.server.netguard import AddressGuard, PinnedBackend, pinned_transport

    def settings(pool: Any) -> tuple[Any, ...]:
        return (pool._max_connections, pool._max_keepalive_connections, pool._keepalive_expiry)

    guard = AddressGuard()
    default = pinned_transport(guard)
    assert settings(default._pool) == settings(httpx.HTTPTransport()._pool) == (100, 20, 5.0)
    assert isinstance(default._pool._network_backend, PinnedBackend)
    limits = httpx.Limits(max_connections=7, max_keepalive_connections=3, keepalive_expiry=2.0)
    assert settings(pinned_transport(guard, limits=limits)._pool) == (7, 3, 2.0)


def test_the_pinned_transport_verifies_tls_with_certifis_store_whatever_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like proxies, CA settings from the environment (``SSL_CERT_FILE``) do not change how
    media is fetched: certificates and host names are checked against certifi's store."""
    import ssl

    import certifi

    from ovss_label.backend.server.netguard import AddressGuard, pinned_transport

    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-ca.pem"))
    context = pinned_transport(AddressGuard())._pool._ssl_context
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    certifis = ssl.create_default_context(cafile=certifi.where())
    assert context.cert_store_stats() == certifis.cert_store_stats()


def test_the_media_client_is_built_from_the_policy_and_ignores_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its timeouts are the policy's; it follows no redirect itself (``download`` checks every
    hop); proxies from the environment are never used (they would skip the address checks);
    Label Studio's own host and port are the one private address it may reach."""
    import httpx

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    policy = MediaPolicy(ls_url="http://LS.internal:8080/studio/", read_timeout=7.0,
                         connect_timeout=3.0)  # fmt: skip
    fetcher = MediaFetcher(policy)
    client = fetcher.client
    assert client.timeout == httpx.Timeout(7.0, connect=3.0)
    assert client.follow_redirects is False and client.trust_env is False
    assert not client._mounts  # no proxy transport mounted from the environment
    guard = client._transport._pool._network_backend.guard
    assert guard.trusted == ("ls.internal", 8080)
    assert (fetcher.ls_origin, fetcher.ls_prefix) == (("http", "ls.internal", 8080), "/studio")
    plain = MediaFetcher(MediaPolicy())
    assert plain.client._transport._pool._network_backend.guard.trusted is None
    assert (plain.ls_origin, plain.ls_prefix) == (None, "")
