"""POST /v1/chat/completions, streamed or whole."""
from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.chat import message_chars
from app.chat_output import ChoiceOutput
from app.errors import bad_request
from app.fanout import Job
from app.generation import Outputs, run_generation
from app.ingress import Ingress
from app.logprobs import chat_logprobs
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
from app.streaming import DONE, ChatChunks
from workers.engine.outputs import RequestOutput
from workers.engine.sampling_params import SamplingParams


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
    params = sampling_params(request, limits=ingress.limits, max_tokens=max_tokens,
                             logprobs=top_n if request.logprobs else None, json_schema=schema)
    parsers = ingress.parsers.for_request(tools_on, forced, prompt.text)
    if parsers.keeps_special_tokens:
        params = dataclasses.replace(params, skip_special_tokens=False)
    return ChatPlan(prompt.text, prompt_ids, params, parsers)


async def create_chat_completion(ingress: Ingress, request: ChatCompletionRequest,
                                 raw: Request) -> Response:
    plan = await run_in_threadpool(plan_chat, ingress, request)
    gen = ChatGeneration(ingress, request, plan)
    ingress.log_prompt(gen.id, plan.prompt)
    return await run_generation(ingress, raw, gen, request.stream)


class ChatGeneration:
    """The n choices of one chat completion, as chunks or one response."""

    endpoint = "chat"
    what = "messages"
    done = DONE

    def __init__(self, ingress: Ingress, request: ChatCompletionRequest, plan: ChatPlan) -> None:
        self.ingress = ingress
        self.request = request
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.top_n = request.top_logprobs or 0
        self.prompt_tokens = len(plan.prompt_ids)
        self.jobs = [Job(i, plan.prompt_ids, per_choice(plan.params, i), f"{self.id}-{i}")
                     for i in range(request.n)]
        self.choices = [ChoiceOutput(i, plan.parsers) for i in range(request.n)]

    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def usage(self) -> Usage:
        cached = min(c.cached_tokens for c in self.choices)
        return Usage.of(self.prompt_tokens, self.completion_tokens(), cached)

    def record(self, index: int, out: RequestOutput) -> None:
        self.choices[index].record(out)

    def finish_reason(self) -> str:
        return self.choices[0].streamed_finish_reason()

    def logprobs(self, entries: list) -> ChatLogprobs | None:
        if not self.request.logprobs or not entries:
            return None
        return chat_logprobs(self.ingress.texts, entries, self.top_n)

    async def respond(self) -> Response:
        choices = []
        for choice in self.choices:
            reasoning, content, calls = choice.message_parts()
            message = AssistantMessage(content=content, tool_calls=calls,
                                       reasoning_content=reasoning)
            choices.append(ChatChoice(
                index=choice.index, message=message,
                logprobs=chat_logprobs(self.ingress.texts, choice.logprobs, self.top_n)
                if self.request.logprobs else None,
                finish_reason=choice.openai_finish_reason(bool(calls))))
        response = ChatCompletionResponse(id=self.id, created=int(time.time()),
                                          model=self.ingress.model_name, choices=choices,
                                          usage=self.usage())
        return JSONResponse(response.model_dump())

    async def events(self, outputs: Outputs) -> AsyncGenerator[str, None]:
        options = self.request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and options is not None and options.continuous_usage_stats
        chunks = ChatChunks(self.id, int(time.time()), self.ingress.model_name,
                            self.usage if continuous else None)
        for choice in self.choices:
            yield chunks.role(choice.index)
        async for index, out in outputs:
            choice = self.choices[index]
            choice.record(out)
            deltas = choice.feed(out.text) + (choice.flush() if out.finished else [])
            for delta in deltas:
                yield chunks.delta(index, delta, self.logprobs(choice.take_logprobs()))
            if out.finished:
                yield chunks.finish(index, choice.streamed_finish_reason(),
                                    self.logprobs(choice.take_logprobs()))
        if include_usage:
            yield chunks.usage(self.usage())
