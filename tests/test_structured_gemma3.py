"""Structured output and tool calling on the other real small model, Gemma 3 270M (a SentencePiece vocabulary of
262k tokens with byte fallback, where SmolLM2's is byte-level BPE), through the real server with the real
`openai` client: JSON-schema answers parse and validate, a forced tool call round-trips. Kept short (Gemma 3
decodes slowly on a CPU); streaming and the other tool_choice modes are covered on SmolLM2 (test_tools.py)."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, Field
from test_tools import TIME, WEATHER, WeatherArgs


@pytest.fixture(scope="module")
def client(gemma3):
    from test_server import Server

    from spillover.engine.async_engine import AsyncLLM
    from spillover.llm import LLM
    from spillover.server.app import create_app

    llm = AsyncLLM(LLM(gemma3, progress=False, max_batch_size=8, max_seq_len=1024))
    srv = Server(create_app(llm))
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=180)
    srv.stop()
    llm.shutdown()


def _model(client) -> str:
    return client.models.list().data[0].id


class Answer(BaseModel, extra="forbid"):  # short answers: a few tokens each
    ok: bool
    n: int = Field(ge=0, le=99)


def test_gemma3_json_schema_answers_validate(client):
    schema = {**Answer.model_json_schema(), "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": "Yes or no?"}],
                                       max_tokens=24, temperature=1.0, n=3, seed=11, response_format=fmt)  # fmt: skip
    for c in r.choices:  # three seeded samples at temperature 1, one batch
        assert c.finish_reason == "stop", c.message.content
        Answer.model_validate_json(c.message.content, strict=True)


def test_gemma3_forced_tool_call_round_trip(client):
    model = _model(client)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=model, messages=ask, tools=[WEATHER, TIME], tool_choice=named,
                                       max_tokens=48, temperature=0)  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    WeatherArgs.model_validate_json(call.function.arguments)
    turn2 = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18})},
    ]
    final = client.chat.completions.create(model=model, messages=turn2, tools=[WEATHER, TIME], max_tokens=2,
                                           temperature=0, tool_choice="none")  # fmt: skip
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    alone = client.chat.completions.create(model=model, messages=ask, tools=[WEATHER, TIME], max_tokens=1,
                                           tool_choice="none")  # fmt: skip
    assert (
        final.usage.prompt_tokens > alone.usage.prompt_tokens + 20
    )  # the call and its result are in the prompt
