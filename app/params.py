"""Request fields to the engine's SamplingParams, with the checks only the ingress can make
(n, prompt size before tokenizing, logit_bias keys, schemas), each a 400 naming the parameter.
Context length, token ids and value ranges are the engine's and SamplingParams' to check."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import jsonschema

from app.errors import bad_request
from app.protocol import (
    ChatCompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    SamplingRequest,
    Tool,
)
from workers.engine.sampling_params import SamplingParams

TOKEN_ID = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only: "²" and "１" pass isdigit()
MAX_SCHEMA_DEPTH = 64  # levels of objects and arrays; validators recurse once per level


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_n: int
    max_prompt_chars: int | None = None  # longer text cannot fit the context, however tokenized
    max_choices: int | None = None  # engine calls one request may have at once (prompts x n)


def prompt_chars_bound(max_model_len: int, tokenizer: Any) -> int:
    """Characters beyond which no text fits max_model_len tokens: no token covers more
    characters than the longest vocabulary entry (4x spare for normalizers that merge)."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_model_len * longest * 4


def check_choices(prompts: int, n: int, limits: Limits) -> None:
    """Every choice of a request runs at once: more than the replicas hold can never start."""
    if limits.max_choices is not None and prompts * n > limits.max_choices:
        raise bad_request(
            f"This request asks for {prompts * n} completions ({prompts} prompts x n={n}), "
            f"more than the {limits.max_choices} the model replicas can hold at once. Send "
            "fewer prompts per request or a smaller n.", "n" if n > 1 else "prompt")


def check_prompt_chars(chars: int, limits: Limits, what: str) -> None:
    """A text too long for the context is rejected before it is tokenized."""
    if limits.max_prompt_chars is not None and chars > limits.max_prompt_chars:
        raise bad_request(
            f"This model's maximum context length is {limits.max_model_len} tokens. However, "
            f"your {what} has {chars} characters, more than that many tokens could hold. "
            f"Please reduce the length of the {what}.", what, "context_length_exceeded")


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"Token id {token_id} is out of range [0, {vocab_size}).", param)


def schema_of_response_format(response_format: ResponseFormat | None) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    spec = response_format.json_schema
    if spec is None or spec.json_schema is None:
        raise bad_request("response_format of type json_schema needs json_schema.schema.",
                          "response_format.json_schema")
    return spec.json_schema


def tool_call_schema(tools: list[Tool], name: str | None) -> dict:
    """Schema of a Hermes payload calling `name`, or any of the tools when name is None."""
    options = [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [t.function.name]},
                       "arguments": t.function.parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in tools if name is None or t.function.name == name]
    return options[0] if len(options) == 1 else {"anyOf": options}


def chat_schema(request: ChatCompletionRequest) -> dict | None:
    """The constraint on a chat answer: a forced tool call, or the response format."""
    choice = request.tool_choice
    if choice is None or choice in ("none", "auto"):
        return schema_of_response_format(request.response_format)
    if not request.tools:
        raise bad_request("tool_choice needs tools.", "tool_choice")
    if request.response_format is not None and request.response_format.type != "text":
        raise bad_request("response_format cannot be combined with a forced tool_choice.",
                          "response_format")
    name = choice.function.name if isinstance(choice, NamedToolChoice) else None  # "required"
    if name is not None and name not in {t.function.name for t in request.tools}:
        raise bad_request(f"tool_choice names {name!r}, which is not in tools.", "tool_choice")
    return tool_call_schema(request.tools, name)


def nesting_depth(value: object) -> int:
    """Levels of dicts and lists in a JSON value, counted without recursion."""
    depth, level = 0, [value]
    while level:
        level = [child for item in level if isinstance(item, dict | list)
                 for child in (item.values() if isinstance(item, dict) else item)]
        depth += 1
    return depth - 1


def check_schema(schema: dict | None, param: str) -> None:
    if schema is None:
        return
    if nesting_depth(schema) > MAX_SCHEMA_DEPTH:
        raise bad_request(f"The JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep.",
                          param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise bad_request(f"Invalid JSON schema: {e.message}", param) from e
    except RecursionError as e:  # self-referencing or deep $refs
        raise bad_request("The JSON schema is nested too deeply.", param) from e


def sampling_params(request: SamplingRequest, *, limits: Limits, max_tokens: int | None,
                    logprobs: int | None, json_schema: dict | None) -> SamplingParams:
    """Parameters of choice 0; `per_choice` derives the others."""
    if not 1 <= request.n <= limits.max_n:
        raise bad_request(f"n must be between 1 and {limits.max_n}, got {request.n}.", "n")
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options is only allowed when stream is true.",
                          "stream_options")
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        if not TOKEN_ID.fullmatch(key):
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias")
        bias[int(key)] = value
    check_schema(json_schema, "response_format")
    grammar = request.structured_outputs.grammar if request.structured_outputs else None
    if request.structured_outputs is not None and grammar is None:
        raise bad_request("structured_outputs needs a grammar.", "structured_outputs.grammar")
    if grammar is not None and json_schema is not None:
        raise bad_request("structured_outputs cannot be combined with response_format or a "
                          "forced tool_choice.", "structured_outputs")
    return SamplingParams(
        n=request.n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=-1 if request.top_k is None else request.top_k,
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0 if request.repetition_penalty is None
        else request.repetition_penalty,
        seed=request.seed,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        stop=[request.stop] if isinstance(request.stop, str) else request.stop or [],
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        logit_bias=bias,
        skip_special_tokens=request.skip_special_tokens,
        json_schema=json_schema,
        grammar=grammar,
    )


def per_choice(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of an n-choice request: one engine call each, seeds apart."""
    seed = None if params.seed is None else params.seed + index
    return replace(params, n=1, seed=seed)
