"""Raw HTTP: every answer validates against OpenAI's published schemas; every error is OpenAI's envelope."""

from __future__ import annotations

import httpx
import jsonschema
import pytest
from openai_schemas import ERROR_RESPONSE, IMAGES_RESPONSE, LIST_MODELS_RESPONSE, MODEL

_FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


def validate(instance, schema):
    jsonschema.Draft202012Validator(schema, format_checker=_FORMATS).validate(instance)


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    validate(body, ERROR_RESPONSE)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_images_response_validates_for_url_and_b64(server):
    for response_format in ("url", "b64_json"):
        response = httpx.post(
            f"{server.base_url}/v1/images/generations",
            timeout=60,
            json={
                "prompt": "a harbour at dawn",
                "size": "48x32",
                "n": 2,
                "response_format": response_format,
                "num_inference_steps": 1,
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        validate(body, IMAGES_RESPONSE)
        assert len(body["data"]) == 2
        assert all(response_format in item for item in body["data"])


def test_models_responses_validate(server):
    listing = httpx.get(f"{server.base_url}/v1/models").json()
    validate(listing, LIST_MODELS_RESPONSE)
    validate(httpx.get(f"{server.base_url}/v1/models/flux.2-flex").json(), MODEL)


def test_schema_check_can_fail():
    with pytest.raises(jsonschema.ValidationError):
        validate({"error": {"message": "m", "type": "t", "param": 3, "code": None}}, ERROR_RESPONSE)
    with pytest.raises(jsonschema.ValidationError):
        validate({"created": 1, "data": [{"url": "not a uri"}]}, IMAGES_RESPONSE)


@pytest.mark.parametrize(
    "method, path, body, status, param, code",
    [
        ("POST", "/v1/images/generations", {}, 400, "prompt", "missing_required_parameter"),
        ("POST", "/v1/images/generations", {"prompt": 5}, 400, "prompt", "invalid_value"),
        ("POST", "/v1/images/generations", {"prompt": "x", "n": 2.5}, 400, "n", "invalid_value"),
        ("POST", "/v1/images/generations", {"prompt": "x", "size": 1024}, 400, "size", "invalid_value"),
        ("POST", "/v1/images/generations", {"prompt": "x", "output_format": "bmp"}, 400, "output_format", None),
        ("POST", "/v1/images/generations", {"prompt": "x", "model": "nope"}, 404, "model", "model_not_found"),
        ("POST", "/v1/images/generations", [1, 2], 400, None, "invalid_json"),
        ("POST", "/v1/images/generations", "not json", 400, None, "invalid_json"),
        ("GET", "/v1/images/generations", None, 405, None, "method_not_allowed"),
        ("GET", "/v1/nothing-here", None, 404, None, "not_found"),
        ("GET", "/v1/models/nope", None, 404, "model", "model_not_found"),
        ("GET", "/v1/images/files/../../etc/passwd", None, 404, None, None),
        ("GET", "/v1/images/files/AAAAAAAAAAAAAAAAAAAAAA.png", None, 404, "name", "file_not_found"),
    ],
)
def test_errors_use_the_openai_envelope(server, method, path, body, status, param, code):
    kwargs = {}
    if isinstance(body, str):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    response = httpx.request(method, f"{server.base_url}{path}", timeout=30, **kwargs)
    assert_error(response, status, param, code)
    # and the server keeps serving
    ok = httpx.post(
        f"{server.base_url}/v1/images/generations",
        timeout=60,
        json={"prompt": "ok", "size": "16x16", "num_inference_steps": 1},
    )
    assert ok.status_code == 200


def test_health_is_open_and_reports_ok(server):
    response = httpx.get(f"{server.base_url}/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_head_answers_health_and_image_files_with_their_headers_alone(server):
    """Uptime monitors ask /health with HEAD, download managers and `curl -I` an image's url."""
    health = httpx.head(f"{server.base_url}/health")
    assert health.status_code == 200 and health.content == b""
    made = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"prompt": "head", "size": "16x16", "num_inference_steps": 1},
    )
    url = made.json()["data"][0]["url"]
    head, got = httpx.head(url), httpx.get(url)
    assert head.status_code == got.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"] == "image/png"
    assert int(head.headers["content-length"]) == len(got.content) > 0
    missing = httpx.head(f"{server.base_url}/v1/images/files/AAAAAAAAAAAAAAAAAAAAAA.png")
    assert missing.status_code == 404
    assert "head" not in httpx.get(f"{server.base_url}/openapi.json").json()["paths"]["/health"]


def test_openapi_describes_both_image_endpoints(server):
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    generations = spec["paths"]["/v1/images/generations"]["post"]
    edits = spec["paths"]["/v1/images/edits"]["post"]
    assert "application/json" in generations["requestBody"]["content"]
    assert set(edits["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert "$defs" not in str(edits["requestBody"])
    for operation in (generations, edits):
        assert "ImagesResponse" in str(operation["responses"]["200"])
        assert "ErrorResponse" in str(operation["responses"]["400"])
