"""POST /v1/responses (streamed as named events or whole), GET and DELETE of stored responses.

A response runs through the chat generation path: its input becomes chat messages, the model's
deltas go through the same reasoning and tool parsers, and OutputBuilder turns them into
output items. With `store`, the conversation so far is kept for `previous_response_id`.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.chat_completions import ChatPlan, plan_chat
from app.chat_output import ChoiceOutput
from app.errors import APIError, to_api_error
from app.fanout import Job
from app.generation import Outputs, run_generation
from app.ingress import Ingress
from app.responses.conversation import chat_request, request_items, to_messages
from app.responses.output import Event, OutputBuilder
from app.responses.protocol import (
    DeletedResponse,
    IncompleteDetails,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from app.responses.store import ResponseStore
from workers.engine.outputs import RequestOutput


def not_found(response_id: str, param: str | None = None) -> APIError:
    what = "Previous response" if param else "Response"
    return APIError(404, f"{what} with id '{response_id}' not found.", param=param,
                    code="previous_response_not_found" if param else None)


class ResponseRun:
    """One response being generated: its object, the parsers and the output items."""

    endpoint = "responses"
    what = "input"
    done = ""  # the events end themselves

    def __init__(self, ingress: Ingress, store: ResponseStore, request: ResponsesRequest,
                 items: list[dict], plan: ChatPlan) -> None:
        self.ingress = ingress
        self.store = store
        self.items = items  # the conversation up to this response, stored with it
        self.prompt_tokens = len(plan.prompt_ids)
        self.choice = ChoiceOutput(0, plan.parsers)
        self.builder = OutputBuilder(request.parallel_tool_calls)
        self.response = ResponseObject(
            model=ingress.model_name, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            parallel_tool_calls=request.parallel_tool_calls,
            previous_response_id=request.previous_response_id,
            reasoning=request.reasoning or {}, store=request.store,
            temperature=request.temperature, text=request.text,
            tool_choice=request.tool_choice, tools=request.tools or [], top_p=request.top_p,
            user=request.user, metadata=request.metadata or {})
        self.jobs = [Job(0, plan.prompt_ids, plan.params, self.response.id)]

    def completion_tokens(self) -> int:
        return self.choice.completion_tokens

    def record(self, index: int, out: RequestOutput) -> None:
        self.advance(out)

    def finish_reason(self) -> str:
        return "error" if self.response.status == "failed" else \
            self.choice.streamed_finish_reason()

    def advance(self, out: RequestOutput) -> list[Event]:
        self.choice.record(out)
        deltas = self.choice.feed(out.text) + (self.choice.flush() if out.finished else [])
        return [event for delta in deltas for event in self.builder.feed(delta)]

    def finish(self) -> list[Event]:
        response = self.response
        if self.choice.finish_reason == "length":
            response.status = "incomplete"
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        else:
            response.status, response.completed_at = "completed", int(time.time())
        events = self.builder.finish("incomplete" if response.status == "incomplete"
                                     else "completed")
        response.output = self.builder.items
        response.usage = self.usage()
        return events

    def fail(self, error: APIError) -> list[Event]:
        """End as failed; the item under way is closed as incomplete."""
        events = self.builder.close("incomplete")
        code = "server_error" if error.status >= 500 else "invalid_prompt"
        self.response.status = "failed"
        self.response.error = ResponseError(code=code, message=error.message)
        self.response.output = self.builder.items
        self.response.usage = self.usage()
        return events

    def usage(self) -> ResponseUsage:
        reasoning = self.builder.reasoning_text()
        reasoning_tokens = len(self.ingress.tokenizer.encode(reasoning, add_special_tokens=False)
                               ) if reasoning else 0
        output_tokens = self.choice.completion_tokens
        return ResponseUsage.of(self.prompt_tokens, output_tokens, self.choice.cached_tokens,
                                min(reasoning_tokens, output_tokens))

    async def save(self) -> None:
        if self.response.store:
            await self.store.put(self.response.id, {"input": self.items,
                                                    "response": self.response.wire()})

    async def respond(self) -> Response:
        self.finish()
        await self.save()
        return JSONResponse(self.response.wire())

    async def events(self, outputs: Outputs) -> AsyncGenerator[str, None]:
        """Named events numbered from 0; a failure after the start ends it as response.failed."""
        sequence = 0

        def numbered(event: Event) -> str:
            nonlocal sequence
            sequence += 1
            return sse({**event, "sequence_number": sequence - 1})

        def lifecycle(kind: str) -> str:
            return numbered({"type": f"response.{kind}", "response": self.response.wire()})

        yield lifecycle("created")
        yield lifecycle("in_progress")
        try:
            async for _, out in outputs:
                for event in self.advance(out):
                    yield numbered(event)
            for event in self.finish():
                yield numbered(event)
        except Exception as e:  # noqa: BLE001 - after the stream started, any error is an event
            for event in self.fail(to_api_error(e, self.ingress.settings.retry_after_s)):
                yield numbered(event)
            yield lifecycle("failed")
            return
        await self.save()
        yield lifecycle(self.response.status)


async def create_response(ingress: Ingress, store: ResponseStore, request: ResponsesRequest,
                          raw: Request) -> Response:
    ingress.check_model(request.model)
    history: list[dict] = []
    if request.previous_response_id is not None:
        previous = await store.get(request.previous_response_id)
        if previous is None:
            raise not_found(request.previous_response_id, "previous_response_id")
        history = previous["input"] + previous["response"]["output"]
    items = history + request_items(request)
    messages = to_messages(request.instructions, items, first_new=len(history))
    plan = await run_in_threadpool(plan_chat, ingress, chat_request(request, messages), "input")
    run = ResponseRun(ingress, store, request, items, plan)
    ingress.log_prompt(run.response.id, plan.prompt)
    return await run_generation(ingress, raw, run, request.stream)


def sse(payload: dict) -> str:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def get_response(store: ResponseStore, response_id: str) -> JSONResponse:
    record = await store.get(response_id)
    if record is None:
        raise not_found(response_id)
    return JSONResponse(record["response"])


async def delete_response(store: ResponseStore, response_id: str) -> JSONResponse:
    if not await store.delete(response_id):
        raise not_found(response_id)
    return JSONResponse(DeletedResponse(id=response_id).model_dump())
