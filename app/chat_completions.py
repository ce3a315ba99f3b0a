"""POST /v1/chat/completions, streamed or whole."""
from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.chat import message_chars
from app.chat_output import ChoiceOutput
from app.disconnect import collect_unless_disconnected, start_unless_disconnected
from app.errors import bad_request
from app.fanout import Fanout, Job
from app.ingress import Ingress
from app.logprobs import chat_logprobs
from app.metrics import GenerationTimer
from app.params import chat_schema, check_prompt_chars, per_choice, sampling_params
from app.parsers.registry import RequestParsers
from app.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    NamedToolChoice,
    Usage,
)
from app.streaming import ChatChunks, EventStream, sse_body
from workers.engine.sampling_params import SamplingParams


def usage_of(prompt_tokens: int, choices: list[ChoiceOutput]) -> Usage:
    completion = sum(c.completion_tokens for c in choices)
    cached = min(c.cached_tokens for c in choices)
    return Usage.of(prompt_tokens, completion, cached)


@dataclass
class ChatPlan:
    """A chat request made ready for the engine."""
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    parsers: RequestParsers  # what the output goes through: tools on, forced, reasoning


def plan_chat(ingress: Ingress, request: ChatCompletionRequest, what: str = "messages"
              ) -> ChatPlan:
    """Renders, tokenizes and checks a request; run it in a thread (`run_in_threadpool`):
    on large inputs that takes long enough to hold up every other client."""
    ingress.check_model(request.model)
    if request.top_logprobs is not None and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    tools_on = bool(request.tools) and request.tool_choice != "none"
    forced = tools_on and (request.tool_choice == "required"
                           or isinstance(request.tool_choice, NamedToolChoice))
    schema = chat_schema(request)
    check_prompt_chars(message_chars(request.messages), ingress.limits, what)
    prompt = ingress.template.prompt(
        request.messages, request.tools if tools_on else None,
        add_generation_prompt=request.add_generation_prompt,
        continue_final_message=request.continue_final_message,
        template_kwargs=request.chat_template_kwargs)
    check_prompt_chars(len(prompt.masked), ingress.limits, what)
    prompt_ids = prompt.token_ids()
    max_tokens = request.max_completion_tokens
    if max_tokens is None:
        max_tokens = request.max_tokens
    top_n = request.top_logprobs or 0
    params = sampling_params(request, prompt_len=len(prompt_ids), limits=ingress.limits,
                             max_tokens=max_tokens, logprobs=top_n if request.logprobs else None,
                             json_schema=schema, what=what)
    parsers = ingress.parsers.for_request(tools_on, forced, prompt.text)
    if parsers.keeps_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)
    return ChatPlan(prompt.text, prompt_ids, params, parsers)


async def create_chat_completion(ingress: Ingress, request: ChatCompletionRequest,
                                 raw: Request) -> Response:
    plan = await run_in_threadpool(plan_chat, ingress, request)
    prompt_ids, params = plan.prompt_ids, plan.params
    top_n = request.top_logprobs or 0
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    ingress.log_prompt(response_id, plan.prompt)
    jobs = [Job(i, prompt_ids, per_choice(params, i), f"{response_id}-{i}")
            for i in range(request.n)]
    choices = [ChoiceOutput(i, plan.parsers) for i in range(request.n)]
    timer = ingress.metrics.timer("chat", getattr(raw.state, "arrival", time.monotonic()))
    fanout = Fanout(ingress.client, jobs)
    if not await start_unless_disconnected(raw, fanout):
        return Response(status_code=499)
    if request.stream:
        options = request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and options.continuous_usage_stats
        chunks = ChatChunks(response_id, int(time.time()), ingress.model_name,
                            (lambda: usage_of(len(prompt_ids), choices)) if continuous else None)
        events = chat_events(ingress, raw, fanout, choices, chunks, len(prompt_ids), top_n,
                             request.logprobs, include_usage, timer)
        body = sse_body(events, raw, ingress.settings.retry_after_s,
                        lambda: timer.finish(len(prompt_ids),
                                             sum(c.completion_tokens for c in choices)))
        return EventStream(body, on_close=fanout.close)
    if not await collect_unless_disconnected(
            raw, fanout, collect(fanout, choices, timer),
            lambda: timer.finish(len(prompt_ids), sum(c.completion_tokens for c in choices))):
        return Response(status_code=499)
    response = ChatCompletionResponse(
        id=response_id, created=int(time.time()), model=ingress.model_name,
        choices=[whole_choice(ingress, c, request.logprobs, top_n) for c in choices],
        usage=usage_of(len(prompt_ids), choices))
    raw.state.finish_reason = response.choices[0].finish_reason
    return JSONResponse(response.model_dump())


async def collect(fanout: Fanout, choices: list[ChoiceOutput], timer: GenerationTimer) -> None:
    async for index, out in fanout.outputs():
        timer.observe(index, out)
        choices[index].record(out)


def whole_choice(ingress: Ingress, choice: ChoiceOutput, logprobs: bool,
                 top_n: int) -> ChatChoice:
    reasoning, content, calls = choice.message_parts()
    message = AssistantMessage(content=content, tool_calls=calls, reasoning_content=reasoning)
    return ChatChoice(
        index=choice.index, message=message,
        logprobs=chat_logprobs(ingress.texts, choice.logprobs, top_n) if logprobs else None,
        finish_reason=choice.openai_finish_reason(bool(calls)))


async def chat_events(ingress: Ingress, raw: Request, fanout: Fanout,
                      choices: list[ChoiceOutput], chunks: ChatChunks, prompt_tokens: int,
                      top_n: int, logprobs: bool, include_usage: bool,
                      timer: GenerationTimer):
    def unsent(choice: ChoiceOutput) -> ChatLogprobs | None:
        entries = choice.take_logprobs()
        return chat_logprobs(ingress.texts, entries, top_n) if logprobs and entries else None

    for choice in choices:
        yield chunks.role(choice.index)
    async for index, out in fanout.outputs():
        timer.observe(index, out)
        choice = choices[index]
        choice.record(out)
        deltas = choice.feed(out.text) + (choice.flush() if out.finished else [])
        for delta in deltas:
            yield chunks.delta(index, delta, unsent(choice))
        if out.finished:
            yield chunks.finish(index, choice.streamed_finish_reason(), unsent(choice))
    if include_usage:
        yield chunks.usage(usage_of(prompt_tokens, choices))
    raw.state.finish_reason = choices[0].streamed_finish_reason()
