"""The app around an engine whose model is loading, failed, or fails a job: health, 503s, 500s without traces."""

from __future__ import annotations

import threading

from engine_helpers import model_config
from fastapi.testclient import TestClient

from pipeline.engine import Engine
from pipeline.loader import LoadedModel, load_model
from pipeline.pool import ModelPool
from server.app import create_app
from server.settings import Settings


def _app(tmp_path, folder, load):
    engine = Engine(ModelPool([model_config(folder)], load=load))
    return create_app(Settings(model_ids={"tiny": "tiny"}, output_dir=tmp_path), engine)


def test_health_names_test_models_by_every_id():
    settings = Settings(model_ids={"tiny": "tiny", "flux.2-klein-4b": "tiny", "real": "real"}, test_models=("tiny",))
    assert settings.test_model_ids == ["tiny", "flux.2-klein-4b"]


def test_health_is_503_while_loading_then_200(tmp_path, tiny_klein):
    release = threading.Event()

    def slow_load(spec, placement, adapters):
        release.wait(30)
        return load_model(spec, placement, adapters)

    with TestClient(_app(tmp_path, tiny_klein, slow_load)) as client:
        loading = client.get("/health")
        assert (loading.status_code, loading.json()["status"]) == (503, "loading")
        busy = client.post("/v1/images/generations", json={"prompt": "x"})
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "model_not_ready" and "retry shortly" in busy.json()["error"]["message"]
        release.set()
        client.app.state.engine.wait_ready(30)
        assert client.get("/health").status_code == 200
        assert client.get("/health").json()["test_models"] == []  # not marked as test weights: no Playground banner
        assert client.post("/v1/images/generations", json={"prompt": "x", "size": "16x16"}).status_code == 200


def test_failed_load_is_reported(tmp_path, tiny_klein):
    def broken_load(spec, placement, adapters):
        raise RuntimeError("CUDA out of memory while loading")

    with TestClient(_app(tmp_path, tiny_klein, broken_load)) as client:
        client.app.state.engine.wait_ready(30)
        health = client.get("/health")
        assert health.status_code == 503
        assert health.json()["status"] == "failed" and "out of memory" in health.json()["error"]
        answer = client.post("/v1/images/generations", json={"prompt": "x"})
        assert answer.status_code == 503
        assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
        message = answer.json()["error"]["message"]  # lasting: no 'retry shortly', which waiting cannot make true
        assert "failed to load" in message and "out of memory" in message and "retry" not in message


def test_a_failing_job_is_a_500_without_a_trace_and_the_server_keeps_serving(tmp_path, tiny_klein):
    def exploding_load(spec, placement, adapters):
        model = load_model(spec, placement, adapters)

        def explode(**kwargs):
            raise RuntimeError("secret internal detail")

        return LoadedModel(
            spec=model.spec,
            placement=model.placement,
            pipe=type(
                "Exploding",
                (),
                {"__call__": staticmethod(explode), "__getattr__": lambda self, n: getattr(model.pipe, n)},
            )(),
        )

    with TestClient(_app(tmp_path, tiny_klein, exploding_load), raise_server_exceptions=False) as client:
        client.app.state.engine.wait_ready(30)
        for _ in range(2):
            answer = client.post("/v1/images/generations", json={"prompt": "x", "size": "16x16"})
            assert answer.status_code == 500
            body = answer.json()
            assert body["error"]["type"] == "server_error"
            assert "secret" not in answer.text and "Traceback" not in answer.text
        assert client.get("/health").status_code == 200
