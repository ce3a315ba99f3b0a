"""The OpenAI-compatible FastAPI app, built around an `EngineClient` (app/engine_client.py).

Tokenization and chat templates run here; only token ids and SamplingParams reach the engine.
"""
from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.chat_completions import create_chat_completion
from app.completions import create_completion
from app.engine_client import EngineClient
from app.errors import APIError, install_error_handlers
from app.ingress import Ingress, parse_body
from app.middleware import RequestContext
from app.openapi import openapi_document
from app.params import check_token_ids
from app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from app.responses.protocol import ResponsesRequest
from app.responses.serving import create_response, delete_response, get_response
from app.responses.store import LocalStore, ResponseStore
from app.settings import Settings


def build_app(client: EngineClient, settings: Settings | None = None,
              store: ResponseStore | None = None) -> FastAPI:
    """`store` keeps Responses API responses; by default, in this process."""
    settings = settings or Settings()
    ingress = Ingress.create(client, settings)
    store = store or LocalStore(settings.response_store_records,
                                settings.response_store_mb * 2**20)
    app = FastAPI(title="Pagoda", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ingress = ingress
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(RequestContext, settings=settings, metrics=ingress.metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        request = await parse_body(raw, ChatCompletionRequest)
        return await create_chat_completion(ingress, request, raw)

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Response:
        request = await parse_body(raw, CompletionRequest)
        return await create_completion(ingress, request, raw)

    @app.post("/v1/responses")
    async def responses(raw: Request) -> Response:
        request = await parse_body(raw, ResponsesRequest)
        return await create_response(ingress, store, request, raw)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> Response:
        return await get_response(store, response_id)

    @app.delete("/v1/responses/{response_id}")
    async def remove_response(response_id: str) -> Response:
        return await delete_response(store, response_id)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(ModelList(data=[model_card(ingress)]).model_dump())

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        ingress.check_model(name)
        return JSONResponse(model_card(ingress).model_dump())

    @app.get("/health")
    async def health() -> Response:
        if not client.is_alive():
            raise APIError(503, "The engine is not running.", type="server_error",
                           code="engine_dead")
        return Response(status_code=200)

    document = openapi_document()

    @app.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(document)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = ingress.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(raw: Request) -> JSONResponse:
        request = await parse_body(raw, TokenizeRequest)
        ingress.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "Send exactly one of prompt or messages.", param="prompt")
        tokens = await run_in_threadpool(tokenize_request, ingress, request)
        return JSONResponse(TokenizeResponse(tokens=tokens, count=len(tokens),
                                             max_model_len=ingress.limits.max_model_len)
                            .model_dump())

    @app.post("/detokenize")
    async def detokenize(raw: Request) -> JSONResponse:
        request = await parse_body(raw, DetokenizeRequest)
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
