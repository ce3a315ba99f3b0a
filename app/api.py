"""The OpenAI-compatible FastAPI app, built around an `EngineClient` (app/engine_client.py).

Tokenization and chat templates run here; only token ids and SamplingParams reach the engine.
Request bodies are the pydantic models of app/protocol.py, so FastAPI writes /openapi.json;
every error, a malformed body's too, is a 400-style OpenAI error (app/errors.py), never a 422.
Each route's name is its endpoint label in the request metrics.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.chat_completions import create_chat_completion
from app.completions import create_completion
from app.engine_client import EngineClient
from app.errors import APIError, ErrorResponse, install_error_handlers
from app.ingress import Ingress
from app.middleware import RequestContext
from app.params import check_token_ids
from app.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from app.responses.protocol import DeletedResponse, ResponseObject, ResponsesRequest
from app.responses.serving import create_response, delete_response, get_response
from app.responses.store import LocalStore, ResponseStore
from app.settings import Settings

ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Invalid request (400), wrong API key (401), "
            "unknown model or response (404), body too large (413) or not JSON (415)"},
    503: {"model": ErrorResponse, "description": "Overloaded or no replica available"},
}
# one server-sent event (OpenAPI 3.2's itemSchema): `data: <chunk>`, or a named event
SSE = {"text/event-stream": {"itemSchema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}


def answers(model: type | None, streams: bool = False) -> dict[int | str, dict[str, Any]]:
    """A route's documented responses: `model` as JSON (or SSE events), or an error."""
    ok: dict[str, Any] = {"description": "OK"}
    if model is not None:
        ok["model"] = model
    if streams:
        ok["content"] = SSE
    return {200: ok, **ERRORS}


def build_app(client: EngineClient, settings: Settings | None = None,
              store: ResponseStore | None = None) -> FastAPI:
    """`store` keeps Responses API responses; by default, in this process."""
    settings = settings or Settings()
    ingress = Ingress.create(client, settings)
    responses_store = store or LocalStore(settings.response_store_records,
                                          settings.response_store_mb * 2**20)
    # a body without Content-Type is read as JSON, as OpenAI does
    app = FastAPI(title="Pagoda", version="0.1.0", docs_url=None, redoc_url=None,
                  strict_content_type=False)
    app.state.ingress = ingress
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(RequestContext, settings=settings, metrics=ingress.metrics,
                       routes=app.routes)

    @app.post("/v1/chat/completions", name="chat",
              responses=answers(ChatCompletionResponse, streams=True))
    async def chat(request: ChatCompletionRequest, raw: Request) -> Response:
        return await create_chat_completion(ingress, request, raw)

    @app.post("/v1/completions", name="completions",
              responses=answers(CompletionResponse, streams=True))
    async def completions(request: CompletionRequest, raw: Request) -> Response:
        return await create_completion(ingress, request, raw)

    # streamed as named events: `event: <type>` then `data: <event>`
    @app.post("/v1/responses", name="responses", responses=answers(ResponseObject, streams=True))
    async def responses(request: ResponsesRequest, raw: Request) -> Response:
        return await create_response(ingress, responses_store, request, raw)

    @app.get("/v1/responses/{response_id}", name="responses",
             responses=answers(ResponseObject))
    async def retrieve_response(response_id: str) -> Response:
        return await get_response(responses_store, response_id)

    @app.delete("/v1/responses/{response_id}", name="responses",
                responses=answers(DeletedResponse))
    async def delete(response_id: str) -> Response:
        return await delete_response(responses_store, response_id)

    @app.get("/v1/models", name="models", responses=answers(ModelList))
    async def models() -> JSONResponse:
        return JSONResponse(ModelList(data=[model_card(ingress)]).model_dump())

    @app.get("/v1/models/{name:path}", name="models", responses=answers(ModelCard))
    async def model(name: str) -> JSONResponse:
        ingress.check_model(name)
        return JSONResponse(model_card(ingress).model_dump())

    @app.get("/health", name="health", responses=answers(None))
    async def health() -> Response:
        if not client.is_alive():
            raise APIError(503, "The engine is not running.", type="server_error",
                           code="engine_dead")
        return Response(status_code=200)

    @app.get("/metrics", name="metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = ingress.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/tokenize", name="tokenize", responses=answers(TokenizeResponse))
    async def tokenize(request: TokenizeRequest) -> JSONResponse:
        ingress.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "Send exactly one of prompt or messages.", param="prompt")
        tokens = await run_in_threadpool(tokenize_request, ingress, request)
        return JSONResponse(TokenizeResponse(tokens=tokens, count=len(tokens),
                                             max_model_len=ingress.limits.max_model_len)
                            .model_dump())

    @app.post("/detokenize", name="detokenize", responses=answers(DetokenizeResponse))
    async def detokenize(request: DetokenizeRequest) -> JSONResponse:
        ingress.check_model(request.model)
        check_token_ids(request.tokens, ingress.limits.vocab_size, "tokens")
        text = await run_in_threadpool(ingress.tokenizer.decode, request.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())

    return app


def tokenize_request(ingress: Ingress, request: TokenizeRequest) -> list[int]:
    """The token ids a generation request with these messages or this prompt would use."""
    if request.messages is not None:
        return ingress.template.prompt(
            request.messages, request.tools, add_generation_prompt=request.add_generation_prompt,
            template_kwargs=request.chat_template_kwargs).token_ids()
    return ingress.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)


def model_card(ingress: Ingress) -> ModelCard:
    return ModelCard(id=ingress.model_name, max_model_len=ingress.limits.max_model_len)
