"""Parsers by name, and the choice for a model folder from its config.json `model_type` and
chat template, unless the Serve args name one (`api.tool_parser`, `api.reasoning_parser`)."""
from __future__ import annotations

from dataclasses import dataclass

from app.parsers.base import ToolParser
from app.parsers.hermes import TOOL_OPEN, ForcedCallParser, HermesParser
from app.parsers.llama3 import PYTHON_TAG, Llama3JsonParser
from app.parsers.mistral import TOOL_CALLS, MistralParser
from app.parsers.reasoning import THINK_OPEN, ThinkParser, opens_reasoning

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}
# vLLM's names for `<think>` models are accepted as well
REASONING_PARSERS = {"think": ThinkParser, "deepseek_r1": ThinkParser, "qwen3": ThinkParser}
AUTO, NONE = "auto", "none"
FAMILY_OF_MODEL_TYPE = {"llama": "llama3_json", "mistral": "mistral", "qwen2": "hermes",
                        "qwen3": "hermes", "qwen2_moe": "hermes", "qwen3_moe": "hermes"}


class UnknownParserError(ValueError):
    pass


@dataclass(frozen=True)
class ParserChoice:
    tool: str | None  # None: only forced (constrained) calls are read
    reasoning: str | None
    reason: str  # why, for the start-up log

    def for_request(self, tools_on: bool, forced: bool, prompt: str) -> RequestParsers:
        tool = "forced" if tools_on and forced else self.tool if tools_on else None
        return RequestParsers(tool, self.reasoning, opens_reasoning(prompt))


@dataclass(frozen=True)
class RequestParsers:
    """The parsers one request's output goes through; each choice gets fresh ones."""

    tool: str | None  # a TOOL_PARSERS name, "forced", or None: no tool calls
    reasoning: str | None
    starts_inside: bool  # the prompt opened a <think> block

    @property
    def keeps_special_tokens(self) -> bool:
        """The tool-call markers are special tokens, which the detokenizer must keep."""
        return self.tool in TOOL_PARSERS and TOOL_PARSERS[self.tool].needs_special_tokens

    def tool_parser(self) -> ToolParser | None:
        if self.tool == "forced":
            return ForcedCallParser()
        return TOOL_PARSERS[self.tool]() if self.tool else None

    def reasoning_parser(self) -> ThinkParser | None:
        if self.reasoning is None:
            return None
        return REASONING_PARSERS[self.reasoning](self.starts_inside)


def detect_tool_parser(model_type: str | None, template: str) -> tuple[str | None, str]:
    if TOOL_CALLS in template:
        return "mistral", "the chat template writes [TOOL_CALLS]"
    if TOOL_OPEN in template:
        return "hermes", "the chat template writes <tool_call>"
    if PYTHON_TAG in template or ("<|start_header_id|>" in template
                                  and '"parameters"' in template):
        return "llama3_json", "the chat template writes Llama 3 JSON calls"
    if "tools" not in template:
        # ChatTemplate then lists the tools in a Hermes-style system prompt
        return "hermes", "the chat template knows no tools; they are offered Hermes-style"
    family = FAMILY_OF_MODEL_TYPE.get(model_type or "")
    if family:
        return family, f"model_type {model_type!r}"
    return None, (f"unknown tool-call format (model_type {model_type!r}): only forced calls "
                  "(tool_choice required or named) are read as tool calls")


def pick(setting: str, names: dict, detected: tuple[str | None, str],
         what: str) -> tuple[str | None, str]:
    """(parser name or None, why) for a Serve-args setting: auto, none or a name."""
    if setting == AUTO:
        return detected
    if setting == NONE:
        return None, f"{what} none"
    if setting in names:
        return setting, "set in the Serve args"
    raise UnknownParserError(f"unknown {what} {setting!r}; choose auto, none or one of "
                             f"{sorted(names)}")


def choose_parsers(model_type: str | None, template: str | None, tool_parser: str = AUTO,
                   reasoning_parser: str = AUTO) -> ParserChoice:
    template = template or ""
    tool, tool_why = pick(tool_parser, TOOL_PARSERS, detect_tool_parser(model_type, template),
                          "tool_parser")
    thinks = THINK_OPEN in template
    reasoning, reasoning_why = pick(
        reasoning_parser, REASONING_PARSERS,
        ("think", "the chat template writes <think>") if thinks else (None, "no <think>"),
        "reasoning_parser")
    return ParserChoice(tool, reasoning, f"tool parser: {tool_why}; reasoning: {reasoning_why}")
