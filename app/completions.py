"""POST /v1/completions, streamed or whole; prompts are text, token ids or lists of either."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from app.disconnect import collect_unless_disconnected, start_unless_disconnected
from app.errors import bad_request
from app.fanout import Fanout, Job
from app.ingress import Ingress
from app.logprobs import completion_logprobs, merge_completion_logprobs
from app.metrics import GenerationTimer
from app.params import (
    check_choices,
    check_prompt_chars,
    check_token_ids,
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
from app.streaming import CompletionChunks, EventStream, sse_body
from workers.engine.outputs import RequestOutput

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


@dataclass
class Prompt:
    text: str
    token_ids: list[int]


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

    def record(self, texts, out: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        """The text and logprobs this output adds to the choice (the echo first)."""
        text, part = out.text, None
        entries, token_ids = list(out.logprobs or []), list(out.token_ids)
        if not self.started:
            self.started = True
            if self.echo:
                text = self.prompt.text + text
                if out.prompt_logprobs is not None:
                    entries = list(out.prompt_logprobs) + entries
                    token_ids = self.prompt.token_ids + token_ids
                else:  # no prompt logprobs from the engine: offsets start after the echo
                    self.offset = len(self.prompt.text)
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


def read_prompts(ingress: Ingress, request: CompletionRequest) -> list[Prompt]:
    raw = request.prompt
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else raw
    if not items:
        raise bad_request("prompt must not be empty.", "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            check_prompt_chars(len(item), ingress.limits, "prompt")
            prompts.append(Prompt(item, ingress.tokenizer.encode(item)))
        else:
            check_token_ids(item, ingress.limits.vocab_size, "prompt")
            prompts.append(Prompt(ingress.tokenizer.decode(item), list(item)))
        if not prompts[-1].token_ids:
            raise bad_request("prompt must not be empty.", "prompt")
    return prompts


def usage_of(prompts: list[Prompt], outputs: list[CompletionOutput]) -> Usage:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion = sum(o.completion_tokens for o in outputs)
    cached = sum(min(o.cached_tokens for o in outputs if o.prompt is p) for p in prompts)
    return Usage.of(prompt_tokens, completion, cached)


async def create_completion(ingress: Ingress, request: CompletionRequest,
                            raw: Request) -> Response:
    ingress.check_model(request.model)
    if request.suffix:
        raise bad_request("suffix is not supported.", "suffix")
    response_id = f"cmpl-{uuid.uuid4().hex}"
    # tokenizing and schema checks of large inputs must not hold up the event loop
    prompts, jobs, outputs = await run_in_threadpool(plan, ingress, request, response_id)
    ingress.log_prompt(response_id, [p.text for p in prompts])
    timer = ingress.metrics.timer("completions", getattr(raw.state, "arrival", time.monotonic()))
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    fanout = Fanout(ingress.client, jobs)
    if not await start_unless_disconnected(raw, fanout):
        return Response(status_code=499)
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = CompletionChunks(response_id, int(time.time()), ingress.model_name)
        events = completion_events(ingress, raw, fanout, outputs, chunks, prompts, include_usage,
                                   timer)
        body = sse_body(events, raw, ingress.settings.retry_after_s,
                        lambda: timer.finish(prompt_tokens,
                                             sum(o.completion_tokens for o in outputs)))
        return EventStream(body, on_close=fanout.close)
    if not await collect_unless_disconnected(
            raw, fanout, collect(ingress, fanout, outputs, timer),
            lambda: timer.finish(prompt_tokens, sum(o.completion_tokens for o in outputs))):
        return Response(status_code=499)
    choices = [CompletionChoice(
        index=o.index, text=o.text, finish_reason=o.finish_reason or "abort",
        logprobs=merge_completion_logprobs(o.logprobs) if o.top_n is not None else None)
        for o in outputs]
    response = CompletionResponse(id=response_id, created=int(time.time()),
                                  model=ingress.model_name, choices=choices,
                                  usage=usage_of(prompts, outputs))
    raw.state.finish_reason = choices[0].finish_reason
    return JSONResponse(response.model_dump())


def plan(ingress: Ingress, request: CompletionRequest, response_id: str
         ) -> tuple[list[Prompt], list[Job], list[CompletionOutput]]:
    """The prompts, one engine job per prompt and choice, and the outputs they fill."""
    prompts = read_prompts(ingress, request)
    check_choices(len(prompts), request.n, ingress.limits)
    schema = schema_of_response_format(request.response_format)
    jobs, outputs = [], []
    for p, prompt in enumerate(prompts):
        limit = ingress.limits.max_model_len
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, limit - len(prompt.token_ids)))
        params = sampling_params(request, prompt_len=len(prompt.token_ids), limits=ingress.limits,
                                 max_tokens=max_tokens, logprobs=request.logprobs,
                                 json_schema=schema, what="prompt")
        if request.echo and request.logprobs is not None:
            params.prompt_logprobs = request.logprobs
        for i in range(request.n):
            index = p * request.n + i
            jobs.append(Job(index, prompt.token_ids, per_choice(params, i),
                            f"{response_id}-{index}"))
            outputs.append(CompletionOutput(index, prompt, request.echo, request.logprobs))
    return prompts, jobs, outputs


async def collect(ingress: Ingress, fanout: Fanout, outputs: list[CompletionOutput],
                  timer: GenerationTimer) -> None:
    async for index, out in fanout.outputs():
        timer.observe(index, out)
        outputs[index].record(ingress.texts, out)


async def completion_events(ingress: Ingress, raw: Request, fanout: Fanout,
                            outputs: list[CompletionOutput], chunks: CompletionChunks,
                            prompts: list[Prompt], include_usage: bool, timer: GenerationTimer):
    async for index, out in fanout.outputs():
        timer.observe(index, out)
        output = outputs[index]
        text, logprobs = output.record(ingress.texts, out)
        if text or logprobs is not None:
            yield chunks.text(index, text, logprobs)
        if out.finished:
            yield chunks.text(index, "", None, output.finish_reason)
    if include_usage:
        yield chunks.usage(usage_of(prompts, outputs))
    raw.state.finish_reason = outputs[0].finish_reason or "abort"
