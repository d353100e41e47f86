"""Fetching `image_url`s over http(s), only when the operator opts in (--allow-remote-images), without letting a
client turn the server against its own network (SSRF).

Every hop is checked: the host is resolved, every address it resolves to must be globally routable (no loopback,
private, link-local, cloud-metadata, shared or reserved ranges, IPv4-mapped ones included), and the connection
goes to the address that was checked (no second lookup an attacker's DNS could answer differently). Redirects are
followed by hand, each one checked again. Size and time are capped."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

Resolver = Callable[[str, int], Awaitable[list[str]]]
# Where a connection to a checked (ip, port) really goes; the identity in production, a test seam otherwise.
Dialer = Callable[[str, int], tuple[str, int]]


class RemoteImageError(Exception):
    """The URL may not or could not be fetched; the message is for the client."""


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def forbidden_reason(address: str) -> str | None:
    """Why a connection to `address` is refused, or None when it is a public address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if ip.is_private:
        return "a private address"
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        return "not a public address"
    return None


class RemoteImageFetcher:
    def __init__(
        self,
        *,
        max_bytes: int,
        timeout: float = 10.0,
        max_redirects: int = 3,
        resolver: Resolver = system_resolver,
        dial: Dialer | None = None,
    ):
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.resolver = resolver
        self.dial = dial or (lambda ip, port: (ip, port))

    async def fetch(self, url: str) -> bytes:
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout)
        except TimeoutError as exc:
            raise RemoteImageError(f"fetching the image took longer than {self.timeout:g} s") from exc

    async def _fetch(self, url: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout, trust_env=False) as client:
            for _ in range(self.max_redirects + 1):
                request = await self._pinned_request(client, url)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise RemoteImageError(f"the image URL answered HTTP {response.status_code}")
                    return await self._read_capped(response)
                finally:
                    await response.aclose()
        raise RemoteImageError(f"more than {self.max_redirects} redirects")

    async def _pinned_request(self, client: httpx.AsyncClient, url: str) -> httpx.Request:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteImageError("only http(s) image URLs with a host name can be fetched")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [str(ipaddress.ip_address(parts.hostname))]  # a literal address needs no lookup
        except ValueError:
            try:
                addresses = await self.resolver(parts.hostname, port)
            except OSError as exc:
                raise RemoteImageError(f"the host {parts.hostname!r} could not be resolved") from exc
        if not addresses:
            raise RemoteImageError(f"the host {parts.hostname!r} has no address")
        for address in addresses:
            reason = forbidden_reason(address)
            if reason:
                raise RemoteImageError(f"the host {parts.hostname!r} resolves to {reason}; it is not fetched")
        ip, real_port = self.dial(addresses[0], port)
        netloc = f"[{ip}]:{real_port}" if ":" in ip else f"{ip}:{real_port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        return client.build_request(
            "GET",
            pinned,
            headers={"Host": host_header, "Accept": "image/*"},
            extensions={"sni_hostname": parts.hostname},
        )

    async def _read_capped(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise RemoteImageError(f"the image is larger than {self.max_bytes // (1024 * 1024)} MB")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body.extend(chunk)
            if len(body) > self.max_bytes:
                raise RemoteImageError(f"the image is larger than {self.max_bytes // (1024 * 1024)} MB")
        return bytes(body)
