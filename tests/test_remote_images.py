"""Remote images (opt-in) and SSRF: addresses checked after resolution and again on every redirect. A guard fails
the test if any socket connects anywhere but loopback: no test here sends traffic off this machine."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from hostile_images import png

from server.remote_images import RemoteImageError, RemoteImageFetcher, forbidden_reason

PUBLIC_IP = "93.184.216.34"  # a documentation-famous public address: checked, never connected to
FAKE_DNS = {
    "public.test": [PUBLIC_IP],
    "loopback.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "private.test": ["10.1.2.3"],
    "v6-loopback.test": ["::1"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "mixed.test": [PUBLIC_IP, "192.168.1.10"],
}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail the test if any socket connects to a non-loopback address."""
    real_connect = socket.socket.connect
    attempts = []

    def guarded(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        attempts.append(host)
        assert ipaddress.ip_address(host).is_loopback, f"a test tried to connect to {host}"
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


async def fake_resolver(host, port):
    if host not in FAKE_DNS:
        raise OSError("unknown host")
    return FAKE_DNS[host]


class _Handler(BaseHTTPRequestHandler):
    hosts_seen: ClassVar[list[str]] = []

    def do_GET(self):  # http.server's naming
        _Handler.hosts_seen.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, png(32, 32)),
            "/to-loopback": (302, f"http://127.0.0.1:{port}/img.png"),
            "/to-metadata": (302, "http://metadata.test/latest/meta-data/"),
            "/to-public": (302, "/img.png"),
            "/loop": (302, "/loop"),
            "/big": (200, b"\0" * 5000),
            "/slow": (200, None),
            "/missing": (404, b"no"),
        }
        status, payload = routes.get(self.path, (404, b""))
        self.send_response(status)
        if status == 302:
            self.send_header("Location", payload)
            self.end_headers()
            return
        if payload is None:
            self.end_headers()
            time.sleep(3)
            return
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_site():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()


def fetcher(port, **options):
    """Connections to the (checked) public address really go to the local test site."""

    def dial(ip, _port):
        return ("127.0.0.1", port) if ip == PUBLIC_IP else (ip, _port)

    return RemoteImageFetcher(
        max_bytes=options.pop("max_bytes", 1_000_000), resolver=fake_resolver, dial=dial, **options
    )


@pytest.mark.parametrize(
    "address, refused",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("10.0.0.1", True),
        ("172.16.5.4", True),
        ("192.168.0.1", True),
        ("169.254.169.254", True),
        ("fd00:ec2::254", True),
        ("100.100.100.200", True),
        ("0.0.0.0", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("224.0.0.1", True),
        ("fe80::1", True),
        ("93.184.216.34", False),
        ("2606:2800:220:1:248:1893:25c8:1946", False),
        ("8.8.8.8", False),
    ],
)
def test_address_check(address, refused):
    assert (forbidden_reason(address) is not None) == refused


@pytest.mark.parametrize(
    "host, reason",
    [
        ("loopback.test", "loopback"),
        ("metadata.test", "link-local"),
        ("private.test", "private"),
        ("v6-loopback.test", "loopback"),
        ("mapped.test", "loopback"),
        ("mixed.test", "private"),
        ("unknown.test", "could not be resolved"),
    ],
)
def test_hosts_resolving_to_internal_addresses_are_refused_without_connecting(host, reason, loopback_only):
    with pytest.raises(RemoteImageError, match=reason):
        asyncio.run(fetcher(1).fetch(f"http://{host}/x.png"))
    assert loopback_only == []


@pytest.mark.parametrize(
    "url", ["ftp://public.test/x.png", "file:///etc/passwd", "http:///nohost", "gopher://public.test/"]
)
def test_other_schemes_are_refused(url):
    with pytest.raises(RemoteImageError):
        asyncio.run(fetcher(1).fetch(url))


def test_a_public_image_is_fetched_with_its_host_name(local_site):
    _Handler.hosts_seen.clear()
    data = asyncio.run(fetcher(local_site).fetch("http://public.test/img.png"))
    assert data == png(32, 32)
    assert _Handler.hosts_seen == ["public.test"]


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/to-loopback", "loopback"),
        ("/to-metadata", "link-local"),
        ("/loop", "redirects"),
        ("/missing", "HTTP 404"),
        ("/big", "larger than"),
        ("/slow", "longer than"),
    ],
)
def test_redirects_are_rechecked_and_limits_hold(local_site, path, reason):
    with pytest.raises(RemoteImageError, match=reason):
        asyncio.run(fetcher(local_site, max_bytes=1000, timeout=1.0).fetch(f"http://public.test{path}"))


def test_a_redirect_to_a_public_address_is_followed(local_site):
    assert asyncio.run(fetcher(local_site).fetch("http://public.test/to-public")) == png(32, 32)


def test_edits_fetch_remote_images_only_when_allowed(tiny_klein, tmp_path, local_site):
    from engine_helpers import model_config
    from fastapi.testclient import TestClient

    from pipeline.engine import Engine
    from pipeline.pool import ModelPool
    from server.app import create_app
    from server.settings import Settings

    def app(allow):
        settings = Settings(model_ids={"tiny": "tiny"}, output_dir=tmp_path, allow_remote_images=allow)
        return create_app(settings, Engine(ModelPool([model_config(tiny_klein)])), remote_fetcher=fetcher(local_site))

    body = {"prompt": "x", "num_inference_steps": 1, "response_format": "b64_json"}
    with TestClient(app(True)) as client:
        client.app.state.engine.wait_ready(30)
        ok = client.post("/v1/images/edits", json={**body, "images": [{"image_url": "http://public.test/img.png"}]})
        assert ok.status_code == 200, ok.text
        assert len(base64.b64decode(ok.json()["data"][0]["b64_json"])) > 0
        refused = client.post(
            "/v1/images/edits", json={**body, "images": [{"image_url": "http://public.test/to-loopback"}]}
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "remote_image_refused"
        assert refused.json()["error"]["param"] == "images[0].image_url"
    with TestClient(app(False)) as client:
        off = client.post("/v1/images/edits", json={**body, "images": [{"image_url": "http://public.test/img.png"}]})
        assert off.status_code == 400 and off.json()["error"]["code"] == "remote_images_disabled"
