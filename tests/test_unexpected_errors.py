"""An unexpected error is a 500 in OpenAI's envelope that carries its x-request-id, and its log line names it."""

from __future__ import annotations

import logging

import httpx
import pytest
from engine_helpers import model_config

from pipeline.engine import Engine
from pipeline.pool import ModelPool
from server.app import create_app
from server.bench_harness import InProcessServer
from server.settings import Settings, model_ids_for


@pytest.fixture
def failing_server(tiny_klein, tmp_path):
    settings = Settings(model_ids=model_ids_for([("tiny", ())]), output_dir=tmp_path / "out", playground=False)
    app = create_app(settings, Engine(ModelPool([model_config(tiny_klein)])))

    @app.get("/v1/boom")
    async def boom():  # a route that fails on purpose
        raise RuntimeError("kaboom: a bug")

    with InProcessServer(app) as server:
        yield server


def test_a_500_carries_its_request_id_and_is_logged_with_it(failing_server, caplog):
    from server.request_ids import RequestIdFilter

    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.ERROR, logger="flux2"):
        response = httpx.get(f"{failing_server.url}/v1/boom", headers={"x-request-id": "req-500-test"}, timeout=30)
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-500-test"
    assert response.json() == {
        "error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert "kaboom" not in response.text  # no trace leaked
    records = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert records and records[0].request_id == "req-500-test"
    assert records[0].exc_info is not None  # the trace is in the log
    # and the server keeps serving
    assert httpx.get(f"{failing_server.url}/v1/models", timeout=30).status_code == 200
