"""The OpenAPI document of the HTTP API, built from the pydantic models in `app/protocol.py`.

The endpoints read raw bodies (so malformed JSON is worded by `app/errors.py`), which hides
their request models from FastAPI's generator; this lists them explicitly instead.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from app.responses.protocol import DeletedResponse, ResponseObject, ResponsesRequest

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {"400": "Invalid request", "401": "Missing or wrong API key",
                  "404": "Unknown model", "503": "Overloaded or no replica available"}


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def json_content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def responses(ok: type[BaseModel] | None, stream: type[BaseModel] | None = None) -> dict:
    content = json_content(ref(ok)) if ok else {}
    if stream is not None:  # `data: <chunk>` events, then `data: [DONE]`
        content["text/event-stream"] = {"schema": {"type": "string"},
                                        "x-event-schema": ref(stream)}
    out: dict[str, Any] = {"200": {"description": "OK", **({"content": content} if content
                                                           else {})}}
    for status, description in ERROR_STATUSES.items():
        out[status] = {"description": description, "content": json_content(ref(ErrorResponse))}
    return out


def post(summary: str, body: type[BaseModel], ok: type[BaseModel],
         stream: type[BaseModel] | None = None) -> dict:
    return {"post": {"summary": summary, "operationId": summary.lower().replace(" ", "_"),
                     "requestBody": {"required": True, "content": json_content(ref(body))},
                     "responses": responses(ok, stream)}}


def get(summary: str, ok: type[BaseModel] | None, parameters: list | None = None,
        method: str = "get") -> dict:
    operation = {"summary": summary, "operationId": summary.lower().replace(" ", "_"),
                 "responses": responses(ok)}
    if parameters:
        operation["parameters"] = parameters
    return {method: operation}


def openapi_document(title: str = "Pagoda", version: str = "0.1.0") -> dict:
    models = [ChatCompletionRequest, ChatCompletionResponse, ChatCompletionChunk,
              CompletionRequest, CompletionResponse, TokenizeRequest, TokenizeResponse,
              DetokenizeRequest, DetokenizeResponse, ModelList, ModelCard, ErrorResponse,
              ResponsesRequest, ResponseObject, DeletedResponse]
    # requests as clients send them, responses as the server writes them
    modes = {m: "validation" if m.__name__.endswith("Request") else "serialization"
             for m in models}
    _, defs = models_json_schema([(m, modes[m]) for m in models], ref_template=REF)
    name_param = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    id_param = {**name_param, "name": "response_id"}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": {
            "/v1/chat/completions": post("Create chat completion", ChatCompletionRequest,
                                         ChatCompletionResponse, ChatCompletionChunk),
            "/v1/completions": post("Create completion", CompletionRequest, CompletionResponse,
                                    CompletionResponse),
            # streamed as named events: `event: <type>` then `data: <event>`
            "/v1/responses": post("Create response", ResponsesRequest, ResponseObject),
            "/v1/responses/{response_id}": {
                **get("Retrieve response", ResponseObject, [id_param]),
                **get("Delete response", DeletedResponse, [id_param], method="delete")},
            "/v1/models": get("List models", ModelList),
            "/v1/models/{name}": get("Retrieve model", ModelCard, [name_param]),
            "/tokenize": post("Tokenize", TokenizeRequest, TokenizeResponse),
            "/detokenize": post("Detokenize", DetokenizeRequest, DetokenizeResponse),
            "/health": get("Health", None),
        },
        "components": {"schemas": defs["$defs"]},
    }
