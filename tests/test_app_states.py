"""The app around an engine whose model is loading, failed, or fails a job: health, 503s, 500s without traces."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from pipeline.engine import Engine
from pipeline.loader import LoadedModel
from pipeline.placement import decide_placement
from pipeline.weights import inspect_model
from server.app import create_app
from server.settings import Settings


def _app(tmp_path, load):
    return create_app(Settings(model_name="m", output_dir=tmp_path), Engine(load))


def test_health_is_503_while_loading_then_200(tmp_path, tiny_klein):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return LoadedModel(spec=inspect_model(tiny_klein), placement=decide_placement(weight_params=1), pipe=None)

    with TestClient(_app(tmp_path, slow_load)) as client:
        loading = client.get("/health")
        assert (loading.status_code, loading.json()["status"]) == (503, "loading")
        busy = client.post("/v1/images/generations", json={"prompt": "x"})
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "model_not_ready"
        release.set()
        client.app.state.engine.wait_ready(30)
        assert client.get("/health").status_code == 200


def test_failed_load_is_reported(tmp_path):
    def broken_load():
        raise RuntimeError("CUDA out of memory while loading")

    with TestClient(_app(tmp_path, broken_load)) as client:
        client.app.state.engine.wait_ready(30)
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed" and "out of memory" in health.json()["error"]
        answer = client.post("/v1/images/generations", json={"prompt": "x"})
        assert answer.status_code == 503
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


class _ExplodingPipe:
    tokenizer = None

    def __call__(self, **kwargs):
        raise RuntimeError("secret internal detail")


def test_a_failing_job_is_a_500_without_a_trace_and_the_server_keeps_serving(tmp_path, tiny_klein):
    def load():
        return LoadedModel(spec=inspect_model(tiny_klein), placement=decide_placement(weight_params=1),
                           pipe=_ExplodingPipe())

    with TestClient(_app(tmp_path, load), raise_server_exceptions=False) as client:
        client.app.state.engine.wait_ready(30)
        for _ in range(2):
            answer = client.post("/v1/images/generations", json={"prompt": "x", "size": "16x16"})
            assert answer.status_code == 500
            body = answer.json()
            assert body["error"]["type"] == "server_error"
            assert "secret" not in answer.text and "Traceback" not in answer.text
        assert client.get("/health").status_code == 200
