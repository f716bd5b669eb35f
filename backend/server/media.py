"""Task media: from a Label Studio task URL to (H, W, 3) uint8 RGB, safely.

URL kinds (label_studio.md §1.7, the SDK's ``get_local_path`` rules):

- ``/data/upload/...``: Label Studio uploads, downloaded from ``LABEL_STUDIO_URL``.
- ``/data/local-files/?d=REL``: read from ``local_root / REL`` when a root is configured (the
  resolved path must stay inside it), else downloaded from Label Studio.
- ``s3://``, ``gs://``, ``azure-blob://``: through Label Studio's presign endpoint
  ``/tasks/{id}/presign/?fileuri=<urlsafe base64>``.
- ``http(s)://``: downloaded directly.

Every download: http(s) only; each hop's host resolved and refused when it is private,
loopback, link-local or reserved unless it is the Label Studio host or ``allow_private``;
redirects followed by hand (each hop checked, at most ``max_redirects``); connect and read
timeouts; the body streamed with a byte cap. The ``Authorization`` header goes only to the
Label Studio host: ``Token`` for a legacy token; for a personal access token (a JWT refresh
token) the SDK's client refreshes an access token and builds ``Bearer`` with it. Decoding
applies EXIF orientation and a pixel cap. Errors are :class:`MediaError` with a message that never
contains the token or a URL's query string (presigned URLs carry credentials there).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import httpx
from numpy.typing import NDArray

from ovss_label.images import decode_rgb, load_rgb

from .settings import MediaPolicy

_CLOUD = ("s3://", "gs://", "azure-blob://")


class MediaError(ValueError):
    """A task's image could not be fetched or decoded; the message says why."""


def redact(url: str) -> str:
    """``url`` without its query string and user info (safe to log)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else parts.path


class MediaFetcher:
    """Fetches task images under a :class:`MediaPolicy`; thread-safe."""

    def __init__(self, policy: MediaPolicy, transport: httpx.BaseTransport | None = None) -> None:
        self.policy = policy
        timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
        self.client = httpx.Client(timeout=timeout, follow_redirects=False, transport=transport)
        self.ls_netloc = urlsplit(policy.ls_url).netloc if policy.ls_url else None
        self._sdk: Any = None  # built on first use of a personal access token
        self._sdk_lock = threading.Lock()
        # httpx logs every request URL at INFO; presigned URLs carry credentials in the query.
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)

    def image(self, url: object, task_id: int | None = None) -> NDArray[Any]:
        """(H, W, 3) uint8 RGB of a task's image URL, EXIF orientation applied."""
        if not isinstance(url, str) or not url:
            raise MediaError("the task has no image URL")
        local = self._local_path(url)
        if local is not None:
            image: NDArray[Any] = load_rgb(local, self.policy.max_pixels)
            return image
        data = self.download(self._absolute(url, task_id))
        decoded: NDArray[Any] = decode_rgb(data, redact(url), self.policy.max_pixels)
        return decoded

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
        if url.startswith("/"):
            if not self.policy.ls_url:
                raise MediaError(f"{redact(url)} is a Label Studio path: set LABEL_STUDIO_URL")
            return self.policy.ls_url.rstrip("/") + url
        if urlsplit(url).scheme not in ("http", "https"):
            raise MediaError(
                f"unsupported URL {redact(url)!r}: only http(s) and Label Studio paths"
            )
        return url

    def download(self, url: str) -> bytes:
        """The body of ``url`` under the policy (module docstring)."""
        for _ in range(self.policy.max_redirects + 1):
            self._check_host(url)
            try:
                with self.client.stream("GET", url, headers=self._headers(url)) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"{redact(url)} answered HTTP {response.status_code}")
                    return self._read_capped(response, url)
            except httpx.TimeoutException as exc:
                raise MediaError(f"{redact(url)} timed out ({type(exc).__name__})") from exc
            except httpx.HTTPError as exc:
                raise MediaError(f"{redact(url)} failed: {type(exc).__name__}") from exc
        raise MediaError(f"more than {self.policy.max_redirects} redirects from {redact(url)}")

    def _read_capped(self, response: httpx.Response, url: str) -> bytes:
        cap = self.policy.max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise MediaError(
                f"{redact(url)} is {int(declared):,} bytes, over the {cap:,}-byte limit"
            )
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > cap:
                raise MediaError(f"{redact(url)} is over the {cap:,}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def _headers(self, url: str) -> dict[str, str]:
        token = self.policy.ls_token
        if not token or urlsplit(url).netloc != self.ls_netloc:
            return {}  # the token never leaves for another host
        if token.count(".") != 2:  # a legacy token; a personal access token is a JWT
            return {"Authorization": f"Token {token}"}
        return {"Authorization": self._access_header(token)}

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
            raise MediaError(f"Label Studio token refresh failed: {type(exc).__name__}") from exc
        return header

    def _check_host(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MediaError(f"unsupported URL {redact(url)!r}")
        if self.policy.allow_private or parts.netloc == self.ls_netloc:
            return
        try:
            infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise MediaError(f"cannot resolve {parts.hostname}: {exc}") from exc
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global:
                raise MediaError(
                    f"{parts.hostname} resolves to the non-public address {address}; set "
                    "OVSS_ALLOW_PRIVATE_URLS=1 to allow it"
                )
