"""Schemathesis cases of /v1/responses from our OpenAPI document: never a server error."""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from responses_helpers import check_response_stream, parse_named_sse
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

OUTPUT_CAP = 4


def bound_cost(body: object, model: str) -> None:
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str):
        body["model"] = model
    value = body.get("max_output_tokens")
    if value is None or (type(value) is int and OUTPUT_CAP < value < 10_000):
        body["max_output_tokens"] = OUTPUT_CAP


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_responses_cases_never_get_a_server_error(server, model_name, mode):
    operation = schemathesis.openapi.from_url(f"{server.url}/openapi.json")["/v1/responses"]["POST"]
    statuses: Counter[int] = Counter()

    @settings(deadline=None, database=None, derandomize=True, max_examples=30,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        bound_cost(case.body, model_name)
        response = case.call(base_url=server.url, timeout=120)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text[:500]
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            check_response_stream(parse_named_sse(response.text))
        else:
            case.validate_response(response, checks=[
                status_code_conformance, content_type_conformance, response_schema_conformance])

    run()
    assert sum(statuses.values()) >= 15
