"""A client that leaves is a 499 with finish_reason="abort" in the metrics and the access log,
one INFO line and no traceback; its generation stops and frees its blocks."""
from __future__ import annotations

import logging
import re
import time

import httpx
import pytest
from api_helpers import wait_idle

pytestmark = pytest.mark.slow

LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
        "ignore_eos": True}
REQUEST_LINE = re.compile(r'pagoda_requests_total\{([^}]*)\} ([0-9.e+]+)')


def request_counts(http: httpx.Client) -> dict[tuple[str, str], float]:
    """(status, finish_reason) -> requests so far, over every endpoint."""
    counts: dict[tuple[str, str], float] = {}
    for labels, value in REQUEST_LINE.findall(http.get("/metrics").text):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = (fields["status"], fields["finish_reason"])
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def leave_mid_stream(url: str, request_id: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client, client.stream(
            "POST", "/v1/chat/completions", json={**LONG, "stream": True},
            headers={"x-request-id": request_id}) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: {")
            if events == 4:
                return
    raise AssertionError("the stream ended before the client left")


def leave_while_waiting(url: str, request_id: str) -> None:
    with httpx.Client(base_url=url, timeout=1.0) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=LONG, headers={"x-request-id": request_id})


def test_clients_that_leave_are_499s_with_one_quiet_log_line(server, engine, http, caplog):
    caplog.set_level(logging.INFO)
    before = request_counts(http)
    leave_mid_stream(server.url, "leaves-mid-stream")
    leave_while_waiting(server.url, "leaves-while-waiting")
    deadline = time.monotonic() + 30
    while request_counts(http).get(("499", "abort"), 0) < before.get(("499", "abort"), 0) + 2:
        assert time.monotonic() < deadline, request_counts(http)
        time.sleep(0.1)
    after = request_counts(http)
    assert after.get(("499", "abort"), 0) - before.get(("499", "abort"), 0) == 2
    fives = sum(v - before.get(k, 0) for k, v in after.items() if k[0].startswith("5"))
    assert fives == 0, after
    wait_idle(engine)  # both generations were aborted in the engine
    for request_id in ("leaves-mid-stream", "leaves-while-waiting"):
        lines = [r for r in caplog.records if request_id in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert lines[0].levelno == logging.INFO and " 499 " in lines[0].getMessage()
        assert "finish=abort" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "never retrieved" not in caplog.text
