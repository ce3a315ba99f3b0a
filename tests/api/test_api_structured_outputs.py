"""`structured_outputs.grammar` (vLLM's extension): EBNF-constrained output, and its 400s."""
from __future__ import annotations

import pytest

GRAMMAR = 'root ::= ("yes" | "no") "."'


def test_grammar_constrains_the_output(http):
    body = {"prompt": "Is the sky green?", "max_tokens": 20, "temperature": 1.0, "seed": 3,
            "structured_outputs": {"grammar": GRAMMAR}}
    texts = {http.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0]["text"]
             for s in range(4)}
    assert texts <= {"yes.", "no."}


@pytest.mark.parametrize("fields,param", [
    ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": GRAMMAR}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
])
def test_bad_structured_outputs_are_400(http, fields, param):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, **fields}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
