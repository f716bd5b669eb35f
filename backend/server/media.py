"""Task media: from a Label Studio task URL to (H, W, 3) uint8 RGB, safely.

URL kinds (docs/label_studio.md §1.7, the SDK's ``get_local_path`` rules):

- ``/data/upload/...``: Label Studio uploads, downloaded from ``LABEL_STUDIO_URL``.
- ``/data/local-files/?d=REL``: read from ``local_root / REL`` when a root is configured (the
  resolved path must stay inside it), else downloaded from Label Studio.
- ``s3://``, ``gs://``, ``azure-blob://``: through Label Studio's presign endpoint
  ``/tasks/{id}/presign/?fileuri=<urlsafe base64>``.
- ``http(s)://``: downloaded directly.

Every download: http(s) only; every connection, at every redirect hop, goes to an address that
was resolved once and checked (``netguard.py``: private, loopback, link-local and reserved
addresses are refused unless allowed; Label Studio's host always passes); redirects followed by
hand (at most ``max_redirects``); a connect timeout, a timeout between bytes and one total
budget for the whole download, redirects included; the body streamed with a byte cap.

The token: the ``Authorization`` header goes only to Label Studio's origin (same scheme, host
and port) and only for its media paths (uploads, local files, storage presign / resolve); any
other Label Studio path from a task is refused, so a task cannot make the backend send an
authenticated request to the API. ``Token`` for a legacy token; for a personal access token (a
JWT refresh token) the SDK's client refreshes an access token and builds ``Bearer`` with it.

Decoding applies EXIF orientation and a pixel cap; decoded local files and Label Studio uploads
are kept in a small byte-bounded cache (clicks on one task decode its image once). Errors are
:class:`MediaError` with a message that never contains the token or a URL's query string
(presigned URLs carry credentials there), and say whether trying again later can help
(``transient``: timeouts, connection failures, 5xx, 429, 401/403, a failed token refresh) or
not (not an image, too big, refused URL, 404).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx
from numpy.typing import NDArray

from ovss_label.images import decode_rgb, load_rgb

from ..lru import ByteLRU
from .netguard import AddressGuard, BlockedAddressError, ResolveError, pinned_transport
from .settings import MediaPolicy

_CLOUD = ("s3://", "gs://", "azure-blob://")
_LS_MEDIA_PATH = re.compile(
    r"/(data/upload/.+|data/local-files/?|storage-data/uploaded/?"
    r"|(tasks|projects)/\d+/(presign|resolve)/?)"
)
"""Label Studio 1.23's media routes (``data_import/urls.py``, ``io_storages/urls.py``)."""
_RETRY_STATUS = {401, 403, 408, 425, 429}  # plus every 5xx: may work on a later request


class MediaError(ValueError):
    """A task's image could not be fetched or decoded; the message says why.

    Attributes:
        transient: True when the same request may succeed later (module docstring).
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def redact(url: str) -> str:
    """``url`` without its query string and user info (safe to log)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # no user info; the port as written
    if parts.scheme:
        return f"{parts.scheme}://{host}{parts.path}"
    return f"//{host}{parts.path}" if host else parts.path  # protocol-relative keeps its host


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the scheme's default port, or None for a malformed URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    except ValueError:
        return None
    return (parts.scheme.lower(), (parts.hostname or "").lower(), port) if parts.hostname else None


class MediaFetcher:
    """Fetches task images under a :class:`MediaPolicy`; thread-safe."""

    def __init__(self, policy: MediaPolicy, transport: httpx.BaseTransport | None = None) -> None:
        self.policy = policy
        self.ls_origin = origin(policy.ls_url) if policy.ls_url else None
        self.ls_prefix = urlsplit(policy.ls_url).path.rstrip("/") if policy.ls_url else ""
        trusted = self.ls_origin[1:] if self.ls_origin else None
        guard = AddressGuard(
            allow_private=policy.allow_private,
            allowed_networks=policy.allowed_networks,
            trusted=trusted,
        )
        timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
        self.client = httpx.Client(
            timeout=timeout,
            follow_redirects=False,
            transport=transport or pinned_transport(guard),
            trust_env=False,
        )
        # A user clicks many times on one task: its image is decoded once. Only images that
        # cannot change are kept: local files by (path, mtime, size, inode), Label Studio
        # uploads (unique file names) by URL.
        self.decoded: ByteLRU[tuple[Any, ...], NDArray[Any]] = ByteLRU(
            policy.decoded_cache_mb << 20, lambda _, image: int(image.nbytes)
        )
        self._sdk: Any = None  # built on first use of a personal access token
        self._sdk_lock = threading.Lock()
        # httpx logs every request URL at INFO; presigned URLs carry credentials in the query.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def image(self, url: object, task_id: int | None = None) -> NDArray[Any]:
        """(H, W, 3) uint8 RGB of a task's image URL, EXIF orientation applied; read-only
        (decoded images are shared, see :attr:`decoded`)."""
        if not isinstance(url, str) or not url:
            raise MediaError("the task has no image URL")
        cap = self.policy.max_pixels
        local = self._local_path(url)
        if local is not None:
            stat = local.stat()
            key = ("file", str(local), stat.st_mtime_ns, stat.st_size, stat.st_ino)
            return self._decoded(key, lambda: load_rgb(local, cap))
        absolute = self._absolute(url, task_id)
        upload = self._to_label_studio_media(absolute) and "/data/upload/" in absolute
        return self._decoded(
            ("upload", absolute) if upload else None,
            lambda: decode_rgb(self.download(absolute), redact(url), cap),
        )

    def _decoded(self, key: tuple[Any, ...] | None, load: Any) -> NDArray[Any]:
        """The image of ``key`` from :attr:`decoded`, or ``load()`` (kept when ``key``)."""
        image = self.decoded.get(key) if key is not None else None
        if image is None:
            image = load()
            image.flags.writeable = False  # shared between requests: nobody may change it
            if key is not None:
                self.decoded.put(key, image)
        return image

    def _local_path(self, url: str) -> Path | None:
        root = self.policy.local_root
        if not url.startswith("/data/local-files/") or root is None:
            return None
        relative = unquote(parse_qs(urlsplit(url).query).get("d", [""])[0])
        path = (root / relative).resolve()
        if not path.is_relative_to(root.resolve()) or not relative:
            raise MediaError(f"local file {relative!r} is outside the configured root")
        if not path.is_file():
            raise MediaError(f"local file {relative!r} does not exist under the root")
        return path

    def _absolute(self, url: str, task_id: int | None) -> str:
        if url.startswith(_CLOUD):
            if task_id is None:
                raise MediaError("a cloud-storage URL needs the task id to be presigned")
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            url = f"/tasks/{task_id}/presign/?fileuri={encoded}"
        if url.startswith("/") and not url.startswith("//"):
            if not self.policy.ls_url:
                raise MediaError(f"{redact(url)} is a Label Studio path: set LABEL_STUDIO_URL")
            if not self._media_path(urlsplit(url).path):
                raise MediaError(f"{redact(url)} is not a Label Studio media path")
            return self.policy.ls_url.rstrip("/") + url
        if urlsplit(url).scheme not in ("http", "https"):
            raise MediaError(
                f"unsupported URL {redact(url)!r}: only http(s) and Label Studio paths"
            )
        return url

    def _media_path(self, path: str) -> bool:
        """True for Label Studio's media routes (no dot segments, even percent-encoded)."""
        segments = unquote(path).split("/")
        return "." not in segments and ".." not in segments and bool(_LS_MEDIA_PATH.fullmatch(path))

    def download(self, url: str) -> bytes:
        """The body of ``url`` under the policy (module docstring)."""
        deadline = time.monotonic() + self.policy.download_timeout
        for _ in range(self.policy.max_redirects + 1):
            with self._get(url, deadline) as response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    status = response.status_code
                    raise MediaError(
                        f"{redact(url)} answered HTTP {status}",
                        transient=status in _RETRY_STATUS or status >= 500,
                    )
                return self._read_capped(response, url, deadline)
        raise MediaError(f"more than {self.policy.max_redirects} redirects from {redact(url)}")

    @contextmanager
    def _get(self, url: str, deadline: float) -> Iterator[httpx.Response]:
        """The streamed response of one hop (closed on exit); failures become MediaErrors."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise MediaError(f"unsupported URL {redact(url)!r}")
        remaining = self._remaining(url, deadline)
        timeout = httpx.Timeout(
            min(self.policy.read_timeout, remaining),
            connect=min(self.policy.connect_timeout, remaining),
        )
        try:
            headers = self._headers(url)
            request = self.client.build_request("GET", url, headers=headers, timeout=timeout)
        except httpx.InvalidURL as exc:
            raise MediaError(f"malformed URL {redact(url)!r}: {exc}") from exc
        try:
            response = self.client.send(request, stream=True)
        except (httpx.HTTPError, ResolveError, BlockedAddressError) as exc:
            raise self._failure(exc, url) from exc
        try:
            yield response
        finally:
            response.close()

    def _failure(self, exc: Exception, url: str) -> MediaError:
        if isinstance(exc, BlockedAddressError):
            return MediaError(str(exc))  # the policy will refuse it next time too
        if isinstance(exc, ResolveError):
            return MediaError(str(exc), transient=True)
        if isinstance(exc, httpx.TimeoutException):
            return MediaError(f"{redact(url)} timed out ({type(exc).__name__})", transient=True)
        return MediaError(f"{redact(url)} failed: {type(exc).__name__}", transient=True)

    def _remaining(self, url: str, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MediaError(
                f"{redact(url)} took longer than the {self.policy.download_timeout:g} s "
                "download budget (OVSS_DOWNLOAD_TIMEOUT)",
                transient=True,
            )
        return remaining

    def _read_capped(self, response: httpx.Response, url: str, deadline: float) -> bytes:
        cap = self.policy.max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise MediaError(
                f"{redact(url)} is {int(declared):,} bytes, over the {cap:,}-byte limit"
            )
        chunks, size = [], 0
        try:
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > cap:
                    raise MediaError(f"{redact(url)} is over the {cap:,}-byte limit")
                chunks.append(chunk)
                self._remaining(url, deadline)  # a server trickling bytes meets the budget
        except httpx.HTTPError as exc:
            raise self._failure(exc, url) from exc
        return b"".join(chunks)

    def _headers(self, url: str) -> dict[str, str]:
        token = self.policy.ls_token
        if not token or not self._to_label_studio_media(url):
            return {}  # the token never leaves for another host or a non-media path
        if token.count(".") != 2:  # a legacy token; a personal access token is a JWT
            return {"Authorization": f"Token {token}"}
        return {"Authorization": self._access_header(token)}

    def _to_label_studio_media(self, url: str) -> bool:
        """True when ``url`` is on Label Studio's origin and one of its media paths."""
        if self.ls_origin is None or origin(url) != self.ls_origin:
            return False
        path = urlsplit(url).path
        if not path.startswith(self.ls_prefix + "/"):
            return False
        return self._media_path(path[len(self.ls_prefix) :])

    def _access_header(self, token: str) -> str:
        """``Bearer <access token>`` for a personal access token (a JWT refresh token).

        The SDK exchanges it at ``/api/token/refresh/`` and caches the access token until it
        expires, behind a lock (``TokensClientExt``); its client builds the header.
        """
        with self._sdk_lock:
            if self._sdk is None:
                from ovss_label.lsapi import make_client

                self._sdk = make_client(str(self.policy.ls_url), token)
            client = self._sdk
        try:
            header: str = client._client_wrapper.get_headers()["Authorization"]
        except Exception as exc:  # an expired or malformed token: say so, without the token
            raise MediaError(
                f"Label Studio token refresh failed: {type(exc).__name__}", transient=True
            ) from exc
        return header
