"""schemathesis against the running server's published OpenAPI: over 1,000 generated requests across the
image endpoints, zero 5xx, every response as the schema says. Outputs are capped tiny (--max-output-megapixels,
--max-steps) so that the requests that are valid still run fast on a CPU."""

from __future__ import annotations

import pytest
import schemathesis
from conftest import RunningServer
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# What this test holds the server to: no 5xx, and every answer (status, content type, headers, body) as the
# published schema says. (Whether the schema states every rule a request must meet is not asserted: some are
# settings, like --max-steps, that no static schema knows.)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

CASES_PER_OPERATION = {"POST /v1/images/generations": 450, "POST /v1/images/edits": 450}
seen: dict[str, int] = {}


@pytest.fixture(scope="module")
def fuzz_server(tiny_klein, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    with RunningServer(
        [
            "--model",
            str(tiny_klein),
            "--max-output-megapixels",
            "0.01",
            "--max-steps",
            "1",
            "--max-queue-images",
            "10000",
            "--log-level",
            "warning",
        ],
        workdir,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=450, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_answers_5xx(case):
    key = f"{case.operation.method.upper()} {case.operation.path}"
    seen[key] = seen.get(key, 0) + 1
    response = case.call(timeout=60)
    assert response.status_code < 500, f"{key} -> {response.status_code}: {response.text[:500]}"
    case.validate_response(response, checks=CHECKS)


def test_enough_cases_ran():
    image_cases = sum(seen.get(op, 0) for op in CASES_PER_OPERATION)
    assert image_cases >= 1000, seen
