"""Outgoing connections that go only where the policy allows: resolve once, check, connect there.

Checking a host's addresses and then letting the HTTP client connect resolves the name twice:
between the two answers a DNS server can switch a public address for a private one (DNS
rebinding), and a redirect can point anywhere. Label Studio's own ``SsrfSafeHTTPAdapter``
(``core/utils/io.py``) closes both by checking the address it connects to; this module does the
same for httpx, one level lower: a network backend for httpcore whose ``connect_tcp`` resolves
the host once, refuses it when any address is not allowed, and connects a socket to exactly the
checked address. Every connection goes through it, so every redirect hop is checked too. TLS
still verifies the certificate against the host name (httpcore passes the name as SNI).

An address is allowed when it is global (public), when it lies in one of the allowed networks
(``OVSS_ALLOWED_NETWORKS``, e.g. a NAS subnet), when private addresses are allowed altogether
(``OVSS_ALLOW_PRIVATE_URLS=1``), or when the host and port are Label Studio's own (it often runs
on a private address). The transport ignores ``HTTP(S)_PROXY``: through a proxy the address
connected to would be the proxy's, and nothing could be checked.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddressError(ValueError):
    """The host resolves to an address the policy refuses; the message names it."""


class ResolveError(OSError):
    """The host name did not resolve (often a passing DNS failure)."""


class AddressGuard:
    """Decides which (host, port) may be connected to, and to which address."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        allowed_networks: Iterable[str] = (),
        trusted: tuple[str, int] | None = None,
    ) -> None:
        """``trusted``: Label Studio's (host, port), allowed at any address."""
        self.allow_private = allow_private
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n.strip(), strict=False) for n in allowed_networks if n.strip()
        )
        self.trusted = (trusted[0].lower(), trusted[1]) if trusted else None

    def allowed(self, address: Address) -> bool:
        """True when ``address`` may be connected to (module docstring)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if self.allow_private or address.is_global:
            return True
        return any(address in network for network in self.networks)

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """The ``getaddrinfo`` entries to connect to, resolved once and checked.

        Raises:
            BlockedAddressError: An address of ``host`` is not allowed (one is enough: which of
                several answers a client uses is not ours to decide).
            ResolveError: The name does not resolve.
        """
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ResolveError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        if self.trusted == (host.lower(), port):
            return infos
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if not self.allowed(address):
                raise BlockedAddressError(
                    f"{host} resolves to the non-public address {address}; set "
                    "OVSS_ALLOW_PRIVATE_URLS=1 or add its network to OVSS_ALLOWED_NETWORKS "
                    "to allow it"
                )
        return infos


class PinnedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, connecting only to addresses :class:`AddressGuard` checked."""

    def __init__(self, guard: AddressGuard) -> None:
        self.guard = guard

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        """A stream to the first checked address of ``host`` that accepts the connection."""
        from httpcore._backends.sync import SyncStream

        last: OSError | None = None
        for family, kind, proto, _, sockaddr in self.guard.resolve(host, port):
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if local_address is not None:
                    sock.bind((local_address, 0))
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(sockaddr)  # the checked address itself: no second resolution
            except TimeoutError as exc:
                sock.close()
                raise httpcore.ConnectTimeout(str(exc)) from exc
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return SyncStream(sock)
        raise httpcore.ConnectError(str(last or f"no address for {host}"))


def pinned_transport(guard: AddressGuard, **options: Any) -> httpx.HTTPTransport:
    """An httpx transport whose every connection goes through :class:`PinnedBackend`.

    httpx has no public hook for a network backend, so the connection pool its transport made
    is replaced by one with the same settings and ours (httpcore's ``ConnectionPool`` takes
    ``network_backend``); proxies from the environment are off (module docstring).
    """
    transport = httpx.HTTPTransport(trust_env=False, **options)
    limits = options.get("limits", httpx.Limits(max_connections=100, max_keepalive_connections=20))
    transport._pool = httpcore.ConnectionPool(
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=PinnedBackend(guard),
    )
    return transport
