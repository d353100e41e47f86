"""Reading an edit's references: several uploads decode on threads (in the upload's order, an error naming the
first bad one), and their digests (the batch key) are hashed in the request, before the job reaches the engine,
whose worker thread would otherwise count them as queue time (35 ms for 4 references of 1024² on an H100)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from engine_helpers import job, model_config
from fastapi.testclient import TestClient
from PIL import Image

from pipeline.engine import Engine
from pipeline.jobs import _digest
from pipeline.pool import ModelPool
from server.app import create_app
from server.settings import Settings

EDIT = "/v1/images/edits"


def _png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_digests_hashed_on_threads_are_each_image_in_order():
    images = [Image.open(io.BytesIO(_png(seed))) for seed in range(5)]
    for image in images:
        image.load()
    expected = tuple(_digest(image) for image in images)
    assert len(set(expected)) == 5
    assert job(prompt="x", references=tuple(images)).reference_digests == expected
    assert job(prompt="x", references=tuple(reversed(images))).reference_digests == tuple(reversed(expected))
    assert job(prompt="x", references=(images[0],)).reference_digests == expected[:1]


@pytest.fixture(scope="module")
def client_and_engine(tiny_klein, tmp_path_factory):
    engine = Engine(ModelPool([model_config(tiny_klein)]))
    app = create_app(Settings(model_ids={"tiny": "tiny"}, output_dir=tmp_path_factory.mktemp("out")), engine)
    with TestClient(app) as client:
        assert engine.wait_ready(120)
        yield client, engine


def test_an_edit_reaches_the_engine_with_its_references_hashed(client_and_engine, monkeypatch):
    client, engine = client_and_engine
    seen = []
    submit = engine.submit

    def spy(job, listener=None):
        seen.append("batch_key" in job.__dict__ and "reference_digests" in job.__dict__)
        return submit(job, listener)

    monkeypatch.setattr(engine, "submit", spy)
    uploads = [("image[]", (f"{i}.png", _png(i), "image/png")) for i in range(3)]
    answer = client.post(
        EDIT,
        data={"prompt": "x", "size": "64x64", "num_inference_steps": "1", "response_format": "b64_json"},
        files=uploads,
    )
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert image.size == (64, 64)
    assert "inputs;dur=" in answer.headers["server-timing"]
    # A masked edit runs alone (its batch key hashes nothing): its digests are still ready before the engine.
    mask = io.BytesIO()
    Image.new("L", (48, 40), 255).save(mask, format="PNG")
    masked = client.post(
        EDIT,
        data={"prompt": "x", "size": "64x64", "num_inference_steps": "1", "response_format": "b64_json"},
        files=[("image", ("0.png", _png(0), "image/png")), ("mask", ("m.png", mask.getvalue(), "image/png"))],
    )
    assert masked.status_code == 200, masked.text
    assert seen == [True, True]


def test_the_first_bad_upload_is_named_in_order(client_and_engine):
    client, _ = client_and_engine
    uploads = [
        ("image[]", ("0.png", _png(0), "image/png")),
        ("image[]", ("1.png", b"not an image", "image/png")),
        ("image[]", ("2.png", b"nor this", "image/png")),
    ]
    answer = client.post(EDIT, data={"prompt": "x", "size": "64x64"}, files=uploads)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"].startswith("Image 2 of 3:") and error["code"] == "invalid_image"
