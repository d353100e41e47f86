"""Shared fixtures: tiny weights built once per session, and a real `flux2-local serve` on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory) -> Path:
    from pipeline.tiny_weights import build_tiny_weights

    return build_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny-klein", "klein")


@pytest.fixture(scope="session")
def tiny_dev(tmp_path_factory) -> Path:
    from pipeline.tiny_weights import build_tiny_weights

    return build_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny-dev", "dev")


def serve_refused(*args: str, **run: Any) -> str:
    """`flux2-local serve ARGS` that must refuse to start: exit status 2 (a usage error, before any model loads);
    its stderr, for the test to check the message. `run`: `subprocess.run`'s cwd or env."""
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **run,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    """A `flux2-local serve` subprocess; its log is kept in a file for failing tests to show."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (the server writes to it; closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port), *args],
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def __enter__(self) -> RunningServer:
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.process.terminate()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code


@pytest.fixture(scope="session")
def server(tiny_klein, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("server")
    with RunningServer(["--model", str(tiny_klein), "--output-dir", str(workdir / "outputs")], workdir) as running:
        running.output_dir = workdir / "outputs"
        yield running


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused-key", max_retries=0, timeout=120)
