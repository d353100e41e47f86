"""A battery of bad inputs: each gets the right status, OpenAI's envelope with all four keys and the parameter
named, and a good request right after it still succeeds. Hostile-but-valid images work."""

from __future__ import annotations

import base64
import json
import re

import httpx
import pytest
from hostile_images import (
    animated_gif,
    bomb_png,
    cmyk_jpeg,
    exif_rotated_jpeg,
    palette_png_with_transparency,
    png,
    rgba_png,
    sixteen_bit_png,
    webp,
)
from imaging import decode_b64

GEN = "/v1/images/generations"
EDIT = "/v1/images/edits"
OK_BODY = {"prompt": "still fine", "size": "16x16", "num_inference_steps": 1, "response_format": "b64_json"}


def js(**body):
    return {"json": {"prompt": "x", **body}}


def raw(content: bytes, content_type="application/json"):
    return {"content": content, "headers": {"content-type": content_type}}


def form(data=None, files=None):
    return {
        "data": {"prompt": "x", "num_inference_steps": "1", **(data or {})},
        "files": files if files is not None else [("image", ("a.png", png(), "image/png"))],
    }


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


CASES = [
    # generations: JSON body and its types
    ("empty object", GEN, {"json": {}}, 400, "prompt"),
    ("null prompt", GEN, {"json": {"prompt": None}}, 400, "prompt"),
    ("number prompt", GEN, {"json": {"prompt": 123}}, 400, "prompt"),
    ("list prompt", GEN, {"json": {"prompt": ["a", "b"]}}, 400, "prompt"),
    ("empty prompt", GEN, js(prompt=""), 400, "prompt"),
    ("blank prompt", GEN, js(prompt=" \n\t "), 400, "prompt"),
    ("huge prompt", GEN, js(prompt="x" * 30000), 400, "prompt"),
    ("n zero", GEN, js(n=0), 400, "n"),
    ("n eleven", GEN, js(n=11), 400, "n"),
    ("n negative", GEN, js(n=-1), 400, "n"),
    ("n text", GEN, js(n="many"), 400, "n"),
    ("n fraction", GEN, js(n=1.5), 400, "n"),
    ("n huge", GEN, js(n=10**30), 400, "n"),
    ("n boolean", GEN, js(n=True), 400, "n"),
    ("size zero", GEN, js(size="0x0"), 400, "size"),
    ("size negative", GEN, js(size="-5x5"), 400, "size"),
    ("size one number", GEN, js(size="1024"), 400, "size"),
    ("size letters", GEN, js(size="axb"), 400, "size"),
    ("size integer", GEN, js(size=1024), 400, "size"),
    ("size too large", GEN, js(size="99999x99999"), 400, "size"),
    ("size three sides", GEN, js(size="64x64x3"), 400, "size"),
    ("ratio zero", GEN, js(aspect_ratio="0:1"), 400, "aspect_ratio"),
    ("ratio divide by zero", GEN, js(aspect_ratio="1:0"), 400, "aspect_ratio"),
    ("ratio words", GEN, js(aspect_ratio="widescreen"), 400, "aspect_ratio"),
    ("resolution zero", GEN, js(resolution="0"), 400, "resolution"),
    ("resolution negative", GEN, js(resolution="-1K"), 400, "resolution"),
    ("resolution NaN", GEN, js(resolution="NaN"), 400, "resolution"),
    ("resolution inf", GEN, js(resolution="inf"), 400, "resolution"),
    ("width negative", GEN, js(aspect_ratio="custom", width=-16, height=16), 400, "width"),
    ("width huge", GEN, js(width=99999, height=64), 400, "width"),
    ("seed negative", GEN, js(seed=-1), 400, "seed"),
    ("seed beyond 2^63", GEN, js(seed=2**64), 400, "seed"),
    ("seed text", GEN, js(seed="lucky"), 400, "seed"),
    ("guidance NaN", GEN, raw(b'{"prompt": "x", "guidance_scale": NaN}'), 400, "guidance_scale"),
    ("guidance Infinity", GEN, raw(b'{"prompt": "x", "guidance_scale": Infinity}'), 400, "guidance_scale"),
    ("guidance overflow", GEN, raw(b'{"prompt": "x", "cfg_scale": 1e400}'), 400, "cfg_scale"),
    ("guidance negative", GEN, js(guidance_scale=-1), 400, "guidance_scale"),
    ("steps zero", GEN, js(num_inference_steps=0), 400, "num_inference_steps"),
    ("steps huge", GEN, js(num_inference_steps=10**9), 400, "num_inference_steps"),
    ("response format", GEN, js(response_format="xml"), 400, "response_format"),
    ("output format", GEN, js(output_format="tiff"), 400, "output_format"),
    ("compression negative", GEN, js(output_compression=-1), 400, "output_compression"),
    ("compression 101", GEN, js(output_compression=101), 400, "output_compression"),
    ("quality", GEN, js(quality="ultra"), 400, "quality"),
    ("safety tolerance 0", GEN, js(safety_tolerance=0), 400, "safety_tolerance"),
    ("safety tolerance text", GEN, js(safety_tolerance="9"), 400, "safety_tolerance"),
    ("prompt enhancement", GEN, js(prompt_enhancement="maybe"), 400, "prompt_enhancement"),
    ("model number", GEN, js(model=42), 400, "model"),
    ("unknown model", GEN, js(model="gpt-image-1"), 404, "model"),
    ("partial images 4", GEN, js(stream=True, partial_images=4), 400, "partial_images"),
    ("stream text", GEN, js(stream="sometimes"), 400, "stream"),
    ("array body", GEN, {"json": [{"prompt": "x"}]}, 400, None),
    ("invalid JSON", GEN, raw(b'{"prompt": "x",'), 400, None),
    ("non-UTF-8 body", GEN, raw(b'{"prompt": "\xff\xfe\xfa"}'), 400, None),
    ("empty body", GEN, raw(b""), 400, None),
    ("text/plain body", GEN, raw(b"a cat", "text/plain"), 400, None),
    ("deeply nested JSON", GEN, raw(b"[" * 100_000 + b"]" * 100_000), 400, None),
    ("lone surrogate", GEN, raw(b'{"prompt": "\\ud800"}'), 400, "prompt"),
    (
        "non-UTF-8 form field",
        EDIT,
        {
            "files": [
                ("prompt", (None, b"\xff\xfe")),
                ("size", (None, b"\xffx\xfe")),
                ("image", ("a.png", png(), "image/png")),
            ]
        },
        400,
        "size",
    ),
    # edits: multipart
    ("no image", EDIT, form(files=[]), 400, "image"),
    (
        "image as text",
        EDIT,
        {"data": {"prompt": "x", "image": "not a file"}, "files": [("x", ("x", b"x"))]},
        400,
        "image",
    ),
    ("zero-byte image", EDIT, form(files=[("image", ("a.png", b"", "image/png"))]), 400, "image"),
    ("corrupt image", EDIT, form(files=[("image", ("a.png", b"\x89PNG\r\n\x1a\nrubbish", "image/png"))]), 400, "image"),
    ("truncated image", EDIT, form(files=[("image", ("a.png", png()[:200], "image/png"))]), 400, "image"),
    ("text file", EDIT, form(files=[("image", ("a.txt", b"hello world", "text/plain"))]), 400, "image"),
    ("decompression bomb", EDIT, form(files=[("image", ("bomb.png", bomb_png(), "image/png"))]), 400, "image"),
    (
        "eleven images",
        EDIT,
        form(files=[("image[]", (f"{i}.png", png(16, 16), "image/png")) for i in range(11)]),
        400,
        "image",
    ),
    (
        "mask of another size",
        EDIT,
        form(files=[("image", ("a.png", png(), "image/png")), ("mask", ("m.png", png(10, 10), "image/png"))]),
        400,
        "mask",
    ),
    (
        "garbage mask",
        EDIT,
        form(files=[("image", ("a.png", png(), "image/png")), ("mask", ("m.png", b"nope"))]),
        400,
        "mask",
    ),
    (
        "two masks",
        EDIT,
        form(files=[("image", ("a.png", png(), "image/png")), ("mask", ("m.png", png())), ("mask", ("n.png", png()))]),
        400,
        "mask",
    ),
    (
        "duplicate prompt",
        EDIT,
        {"files": [("prompt", (None, "a")), ("prompt", (None, "b")), ("image", ("a.png", png(), "image/png"))]},
        400,
        "prompt",
    ),
    ("missing prompt", EDIT, {"data": {"n": "1"}, "files": [("image", ("a.png", png(), "image/png"))]}, 400, "prompt"),
    ("n text in form", EDIT, form(data={"n": "lots"}), 400, "n"),
    ("sync_mode text in form", EDIT, form(data={"sync_mode": "perhaps"}), 400, "sync_mode"),
    ("broken multipart", EDIT, raw(b"--x\r\nContent-Disposition: form-data\r\n\r\n", "multipart/form-data"), 400, None),
    # edits: JSON
    ("no images", EDIT, {"json": {"prompt": "x", "images": []}}, 400, "images"),
    ("images not a list", EDIT, {"json": {"prompt": "x", "images": "data:,"}}, 400, "images"),
    (
        "bad base64",
        EDIT,
        {"json": {"prompt": "x", "images": [{"image_url": "data:image/png;base64,@@@"}]}},
        400,
        "images",
    ),
    ("file URL", EDIT, {"json": {"prompt": "x", "images": [{"image_url": "file:///etc/passwd"}]}}, 400, "images"),
    (
        "metadata URL",
        EDIT,
        {"json": {"prompt": "x", "images": [{"image_url": "http://169.254.169.254/latest"}]}},
        400,
        "images",
    ),
    ("image_url missing", EDIT, {"json": {"prompt": "x", "images": [{}]}}, 400, "images"),
    ("deeply nested JSON edit", EDIT, raw(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), 400, None),
    ("JSON bomb image", EDIT, {"json": {"prompt": "x", "images": [{"image_url": uri(bomb_png())}]}}, 400, "images"),
]


@pytest.mark.parametrize("name, path, request_kwargs, status, param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, name, path, request_kwargs, status, param):
    response = httpx.post(f"{server.base_url}{path}", timeout=60, **request_kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str)
    if param is not None:
        assert re.split(r"[.\[]", body["error"]["param"] or "")[0] == param, body
    assert "Traceback" not in response.text
    after = httpx.post(f"{server.base_url}{GEN}", json=OK_BODY, timeout=60)
    assert after.status_code == 200
    assert decode_b64(after.json()["data"][0]["b64_json"]).size == (16, 16)


# The exact answer where the battery only checks the parameter's first name: each reads as OpenAI's would (a path
# like `images[0].image_url`, no union member pydantic tried, no "400: " of starlette's, never "'None'", a code).
EXACT = [
    ("no body", GEN, raw(b""), None, "invalid_json", "The request body is empty: send a JSON object."),
    (
        "second JSON image bad",
        EDIT,
        js(images=[{"image_url": uri(png())}, {"image_url": "data:image/png;base64,!!!"}]),
        "images[1].image_url",
        "invalid_image",
        "Image 2 of 2: ",
    ),
    ("bare string image", EDIT, js(images=["iVBORw0KGgo="]), "images[0]", "invalid_image", "data URI"),
    (
        "second JSON image no picture",
        EDIT,
        js(images=[{"image_url": uri(png())}, {"image_url": uri(b"not an image")}]),
        "images[1].image_url",
        "invalid_image",
        "Image 2 of 2: ",
    ),
    (
        "JSON mask no picture",
        EDIT,
        js(images=[{"image_url": uri(png())}], mask={"image_url": uri(b"not an image")}),
        "mask.image_url",
        "invalid_mask",
        "The mask: ",
    ),
    (
        "JSON mask string bad",
        EDIT,
        js(images=[uri(png())], mask="data:image/png;base64,!!"),
        "mask",
        "invalid_image",
        "",
    ),
    (
        "JSON labelled as a form (curl -d)",
        GEN,
        raw(b'{"prompt": "x"}', "application/x-www-form-urlencoded"),
        None,
        "invalid_json",
        "Content-Type: application/json (got 'application/x-www-form-urlencoded')",
    ),
    ("bad UTF-8", GEN, raw(b'{"prompt": "\xff\xfe"}'), None, "invalid_json", "The request body is not valid JSON."),
    ("nested too deep", GEN, raw(b"[" * 100_000 + b"]" * 100_000), None, "invalid_json", "not valid JSON"),
    ("empty image object", EDIT, js(images=[{}]), "images[0].image_url", "missing_required_parameter", "'images[0]"),
    ("file_id image", EDIT, js(images=[{"file_id": "f"}]), "images[0].image_url", None, "file_id is not supported"),
    ("image_url a number", EDIT, js(images=[{"image_url": 3}]), "images[0].image_url", "invalid_value", "string"),
    ("lora scale", GEN, js(loras=[{"name": "a", "scale": 9}]), "loras[0].scale", "invalid_value", "'loras[0].scale'"),
    ("float seed too large", GEN, js(seed=1e20), "seed", "invalid_value", "'seed': the number is too large."),
    ("JSON edit with 'image'", EDIT, js(image=uri(png())), "images", None, '"images": [{"image_url"'),
    (
        "no multipart boundary",
        EDIT,
        raw(b"junk", "multipart/form-data"),
        None,
        "invalid_multipart",
        ": Missing boundary",
    ),
    ("images as text", EDIT, form({"images": "[]"}, files=[]), "images", "invalid_image", "'images' must be an"),
]


@pytest.mark.parametrize("name, path, request_kwargs, param, code, message", EXACT, ids=[c[0] for c in EXACT])
def test_bad_input_answers_name_things_as_openai_does(server, name, path, request_kwargs, param, code, message):
    response = httpx.post(f"{server.base_url}{path}", timeout=60, **request_kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert code is None or error["code"] == code, error
    assert message in error["message"], error
    assert "400:" not in error["message"] and "'None'" not in error["message"] and "ImageURL" not in response.text
    assert error["code"] is not None, error


def test_the_battery_is_big_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    "maker, size",
    [
        (animated_gif, (64, 64)),
        (cmyk_jpeg, (64, 64)),
        (palette_png_with_transparency, (64, 64)),
        (sixteen_bit_png, (64, 64)),
        (rgba_png, (64, 64)),
        (exif_rotated_jpeg, (64, 96)),
        (webp, (64, 64)),
    ],
)
def test_hostile_but_valid_images_work(server, maker, size):
    response = httpx.post(
        f"{server.base_url}{EDIT}",
        timeout=60,
        data={"prompt": "x", "num_inference_steps": "1", "response_format": "b64_json"},
        files=[("image", ("upload", maker(), "application/octet-stream"))],
    )
    assert response.status_code == 200, response.text
    assert decode_b64(response.json()["data"][0]["b64_json"]).size == size  # auto size: the (upright) input


def test_body_size_limit_is_a_413(tiny_klein, tmp_path):
    from engine_helpers import model_config
    from fastapi.testclient import TestClient

    from pipeline.engine import Engine
    from pipeline.pool import ModelPool
    from server.app import create_app
    from server.settings import Settings

    app = create_app(
        Settings(model_ids={"tiny": "tiny"}, output_dir=tmp_path, max_body_bytes=1000, max_image_bytes=500),
        Engine(ModelPool([model_config(tiny_klein)])),
    )
    with TestClient(app) as client:
        big = client.post(GEN, content=json.dumps({"prompt": "x" * 2000}), headers={"content-type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield b'{"prompt": "'
            for _ in range(30):
                yield b"x" * 100
            yield b'"}'

        streamed = client.post(GEN, content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        upload = client.post(EDIT, data={"prompt": "x"}, files=[("image", ("a.png", b"\x89PNG" + b"0" * 700))])
        assert upload.status_code == 413
        assert upload.json()["error"]["param"] == "image"
