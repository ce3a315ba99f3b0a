"""OpenAI's Agents SDK against the real server on the real model, through both of its model
classes: the Responses one and the Chat Completions one. A forced call runs our tool, a tool
result goes back to the model, an `output_type` comes back parsed, and streamed runs end as
non-streamed ones do; greedy, both classes reach the same answers."""
from __future__ import annotations

import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow
set_tracing_disabled(True)  # traces would go to OpenAI's servers

GREEDY = ModelSettings(temperature=0, max_tokens=200)
FORCED = ModelSettings(temperature=0, max_tokens=200, tool_choice="required")


class Answer(BaseModel):
    city: str = Field(max_length=20)  # bounded: the grammar ends the JSON within max_tokens
    summary: str = Field(max_length=40)


def weather_tool(calls: list[str]):
    @function_tool
    def get_weather(city: str) -> str:
        """Get the weather for a city."""
        calls.append(city)
        return f"Sunny in {city}"
    return get_weather


@pytest.fixture
def async_client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(params=[OpenAIResponsesModel, OpenAIChatCompletionsModel],
                ids=["responses", "chat"])
def model(request, async_client, model_name):
    return request.param(model_name, async_client)


async def test_forced_call_runs_the_tool(model):
    calls: list[str] = []
    agent = Agent(name="weather", instructions="Use the tools.", model=model,
                  tools=[weather_tool(calls)], model_settings=FORCED,
                  tool_use_behavior="stop_on_first_tool")
    result = await Runner.run(agent, "What is the weather in Paris?")
    assert len(calls) == 1 and calls[0]
    assert result.final_output == f"Sunny in {calls[0]}"
    assert [type(i) for i in result.new_items] == [ToolCallItem, ToolCallOutputItem]

    streamed = Runner.run_streamed(agent, "What is the weather in Paris?")
    raw = [e.data.type async for e in streamed.stream_events() if e.type == "raw_response_event"]
    assert streamed.final_output == result.final_output and calls[1] == calls[0]
    if isinstance(model, OpenAIResponsesModel):  # our own events, in OpenAI's order
        assert raw[:2] == ["response.created", "response.in_progress"]
        assert raw[-1] == "response.completed"
        assert "response.function_call_arguments.done" in raw
    assert "response.function_call_arguments.delta" in raw


async def test_tool_results_go_back_to_the_model_through_either_api(async_client, model_name):
    answers = []
    for model in (OpenAIResponsesModel(model_name, async_client),
                  OpenAIChatCompletionsModel(model_name, async_client)):
        calls: list[str] = []
        agent = Agent(name="weather", instructions="Use the tools.", model=model,
                      tools=[weather_tool(calls)], model_settings=FORCED)
        result = await Runner.run(agent, "What is the weather in Paris?", max_turns=3)
        assert len(calls) == 1  # then tool_choice resets to auto and the model answers
        assert [type(i) for i in result.new_items] == [ToolCallItem, ToolCallOutputItem,
                                                       MessageOutputItem]
        assert isinstance(result.final_output, str) and result.final_output
        answers.append((calls, result.final_output))
    assert answers[0] == answers[1]


async def test_output_type_comes_back_parsed(model):
    agent = Agent(name="facts", instructions="Answer in JSON.", model=model,
                  output_type=Answer, model_settings=GREEDY)
    result = await Runner.run(agent, "Describe the weather in Rome.")
    assert isinstance(result.final_output, Answer) and result.final_output.city

    streamed = Runner.run_streamed(agent, "Describe the weather in Rome.")
    async for _ in streamed.stream_events():
        pass
    assert streamed.final_output == result.final_output
