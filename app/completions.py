"""POST /v1/completions, streamed or whole; prompts are text, token ids or lists of either."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.errors import bad_request
from app.fanout import Job
from app.generation import Outputs, run_generation
from app.ingress import Ingress
from app.logprobs import TokenTexts, completion_logprobs, merge_completion_logprobs
from app.params import (
    check_choices,
    check_prompt_chars,
    per_choice,
    sampling_params,
    schema_of_response_format,
)
from app.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from app.streaming import DONE, CompletionChunks
from workers.engine.outputs import RequestOutput, TokenLogprob

if TYPE_CHECKING:
    from typing_extensions import TypeIs

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


@dataclass
class Prompt:
    token_ids: list[int]
    given: str | None = None  # the text sent; None: token ids, decoded once the engine took them

    def text(self, tokenizer: Any) -> str:
        if self.given is None:
            self.given = tokenizer.decode(self.token_ids)
        return self.given


@dataclass
class CompletionOutput:
    index: int
    prompt: Prompt
    echo: bool
    top_n: int | None  # None: no logprobs
    text: str = ""
    offset: int = 0  # text offset of the next token, for logprobs
    logprobs: list[CompletionLogprobs] = field(default_factory=list)
    started: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0

    def record(self, texts: TokenTexts, out: RequestOutput
               ) -> tuple[str, CompletionLogprobs | None]:
        """The text and logprobs this output adds to the choice (the echo first)."""
        text, part = out.text, None
        entries: list[TokenLogprob | None] = list(out.logprobs or [])
        token_ids = list(out.token_ids)
        if not self.started:
            self.started = True
            if self.echo:
                text = self.prompt.text(texts.tokenizer) + text
                if out.prompt_logprobs is not None:
                    entries = list(out.prompt_logprobs) + entries
                    token_ids = self.prompt.token_ids + token_ids
                else:  # no prompt logprobs from the engine: offsets start after the echo
                    self.offset = len(self.prompt.text(texts.tokenizer))
        if self.top_n is not None and token_ids:
            part = completion_logprobs(texts, entries, token_ids, self.top_n, self.offset)
            self.offset += sum(len(t) for t in part.tokens)
            self.logprobs.append(part)
        self.text += text
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
        return text, part


def is_token_ids(value: object) -> TypeIs[list[int]]:
    """One prompt given as token ids; pydantic has checked that all elements share a type."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], int)


def read_prompts(ingress: Ingress, request: CompletionRequest) -> list[Prompt]:
    raw = request.prompt
    items: Sequence[str | list[int]] = [raw] if isinstance(raw, str) or is_token_ids(raw) else raw
    if not items:
        raise bad_request("prompt must not be empty.", "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            check_prompt_chars(len(item), ingress.limits, "prompt")
            prompts.append(Prompt(ingress.tokenizer.encode(item), item))
        else:
            prompts.append(Prompt(list(item)))
        if not prompts[-1].token_ids:
            raise bad_request("prompt must not be empty.", "prompt")
    return prompts


async def create_completion(ingress: Ingress, request: CompletionRequest,
                            raw: Request) -> Response:
    ingress.check_model(request.model)
    if request.suffix:
        raise bad_request("suffix is not supported.", "suffix")
    # tokenizing and schema checks of large inputs must not hold up the event loop
    gen = await run_in_threadpool(CompletionGeneration, ingress, request)
    ingress.log_prompt(gen.id, [p.given or p.token_ids for p in gen.prompts])
    return await run_generation(ingress, raw, gen, request.stream)


class CompletionGeneration:
    """One engine call per prompt and choice, and the outputs they fill."""

    endpoint = "completions"
    what = "prompt"
    done = DONE

    def __init__(self, ingress: Ingress, request: CompletionRequest) -> None:
        self.ingress = ingress
        self.request = request
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.prompts = read_prompts(ingress, request)
        check_choices(len(self.prompts), request.n, ingress.limits)
        self.prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        schema = schema_of_response_format(request.response_format)
        self.jobs: list[Job] = []
        self.outputs: list[CompletionOutput] = []
        for p, prompt in enumerate(self.prompts):
            max_tokens = request.max_tokens
            if max_tokens is None:
                room = ingress.limits.max_model_len - len(prompt.token_ids)
                max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
            params = sampling_params(request, limits=ingress.limits, max_tokens=max_tokens,
                                     logprobs=request.logprobs, json_schema=schema)
            if request.echo and request.logprobs is not None:
                params.prompt_logprobs = request.logprobs
            for i in range(request.n):
                index = p * request.n + i
                self.jobs.append(Job(index, prompt.token_ids, per_choice(params, i),
                                     f"{self.id}-{index}"))
                self.outputs.append(CompletionOutput(index, prompt, request.echo,
                                                     request.logprobs))

    def completion_tokens(self) -> int:
        return sum(o.completion_tokens for o in self.outputs)

    def usage(self) -> Usage:
        cached = sum(min(o.cached_tokens for o in self.outputs if o.prompt is p)
                     for p in self.prompts)
        return Usage.of(self.prompt_tokens, self.completion_tokens(), cached)

    def record(self, index: int, out: RequestOutput) -> None:
        self.outputs[index].record(self.ingress.texts, out)

    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason or "abort"

    async def respond(self) -> Response:
        choices = [CompletionChoice(
            index=o.index, text=o.text, finish_reason=o.finish_reason or "abort",
            logprobs=merge_completion_logprobs(o.logprobs) if o.top_n is not None else None)
            for o in self.outputs]
        response = CompletionResponse(id=self.id, created=int(time.time()),
                                      model=self.ingress.model_name, choices=choices,
                                      usage=self.usage())
        return JSONResponse(response.model_dump())

    async def events(self, outputs: Outputs) -> AsyncGenerator[str, None]:
        chunks = CompletionChunks(self.id, int(time.time()), self.ingress.model_name)
        async for index, out in outputs:
            output = self.outputs[index]
            text, logprobs = output.record(self.ingress.texts, out)
            if text or logprobs is not None:
                yield chunks.text(index, text, logprobs)
            if out.finished:
                yield chunks.text(index, "", None, output.finish_reason)
        options = self.request.stream_options
        if options is not None and options.include_usage:
            yield chunks.usage(self.usage())
