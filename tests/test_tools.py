"""Tool calling: parsers on recorded outputs of each template family (incremental = whole), the forced-call
grammar, and the real server with the real `openai` client on SmolLM2 (a template without tool support, so
tools go into the system message and calls come back as <tool_call> blocks)."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from spillover.errors import ConfigError
from spillover.structured.tools import (
    ToolCallParser,
    assemble,
    detect_format,
    parse_tool_calls,
    plan_tools,
    render_messages,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


class WeatherArgs(BaseModel, extra="forbid"):
    city: str
    unit: str


# recorded answers of each family (Qwen2.5 / Hermes, Llama 3.1, Mistral v0.3 with [TOOL_CALLS] kept and dropped)
RECORDED = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Oslo", "unit": "celsius"}), ("get_time", {})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}',
     None, [("get_weather", {"city": "Rome", "unit": "celsius"})]),
    ('{"name": "get_weather", "parameters": {"city": "a \\"quoted\\" {city}", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {}}',
     None, [("get_weather", {"city": 'a "quoted" {city}', "unit": "celsius"}), ("get_time", {})]),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}]',
     None, [("get_weather", {"city": "Lyon", "unit": "celsius"})]),
    ('[{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}]', None, [("get_time", {"tz": "CET"})]),
    ("The weather is fine {really}.", "The weather is fine {really}.", []),
]  # fmt: skip


@pytest.mark.parametrize("text,content,calls", RECORDED)
def test_parsers_on_recorded_outputs(text, content, calls):
    got_content, got = parse_tool_calls(text)
    assert got_content == content
    assert [(n, json.loads(a)) for _, n, a in got] == calls
    assert all(i.startswith("call_") for i, _, _ in got) and len({i for i, _, _ in got}) == len(got)
    p = ToolCallParser()  # one character at a time, as a stream would bring it
    events = [e for ch in text for e in p.push(ch)] + p.finish()
    inc_content, inc = assemble(events)
    assert (inc_content, [c[1:] for c in inc]) == (got_content, [c[1:] for c in got])


def test_parallel_off_keeps_the_first_call():
    assert len(parse_tool_calls(RECORDED[1][0], parallel=False)[1]) == 1


def test_formats_and_plans():
    assert detect_format("{{ messages }}").name == "hermes" and not detect_format("{{ messages }}").native
    assert detect_format("{% if tools %}<tool_call>{% endif %}").native
    assert detect_format("{% for t in tools %}<|python_tag|>{% endfor %}").args_key == "parameters"
    assert detect_format("{% if tools %}[TOOL_CALLS]{% endif %}").name == "mistral"
    with pytest.raises(ConfigError, match="not among the tools"):
        plan_tools(None, [WEATHER], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ConfigError, match="needs tools"):
        plan_tools(None, [], "required")
    assert (
        plan_tools(None, [WEATHER], None).choice == "auto" and plan_tools(None, None, None).choice == "none"
    )


def test_fallback_rendering_of_a_tool_loop():
    plan = plan_tools(None, [WEATHER], "auto")
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    msgs, tools = render_messages(
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [call]},
         {"role": "tool", "content": "18 C", "tool_call_id": "call_1"},
         {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}], plan)  # fmt: skip
    assert tools is None and [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "<tools>" in msgs[0]["content"] and '"get_weather"' in msgs[0]["content"]
    assert (
        msgs[2]["content"]
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert msgs[3]["content"].count("<tool_response>") == 2
    native = plan_tools("{% if tools %}<tool_call>{% endif %}", [WEATHER], "auto")
    msgs, tools = render_messages([{"role": "assistant", "tool_calls": [call]}], native)
    assert tools == [WEATHER] and msgs[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


# The tool parts of Qwen2.5's chat template (the full template also handles system prompts without tools).
QWEN25_TOOLS = """{%- if tools %}
{{- '<|im_start|>system\n' }}{{- 'You are Qwen.' }}
{{- "\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools><|im_end|>\n" }}
{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == "tool" %}
{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""


def test_native_template_renders_tools_calls_and_results():
    from spillover.loading.chat_template import ChatTemplate

    plan = plan_tools(QWEN25_TOOLS, [WEATHER], "required")
    assert plan.fmt.name == "hermes" and plan.fmt.native
    call = {
        "id": "call_9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    msgs, tools = render_messages(
        [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
         {"role": "tool", "content": "18 C", "tool_call_id": "call_9"}], plan)  # fmt: skip
    text = ChatTemplate(QWEN25_TOOLS).render(msgs, tools=tools)
    assert json.dumps(WEATHER) in text  # the tools, as the template writes them
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    )
    assert (
        "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n" in text
    )
    # the forced grammar writes calls the way the template shows them
    assert 'call: "<tool_call>\\n" (c0) "\\n</tool_call>"' in plan.grammar()


# ------------------------------------------------------------------ the real server


@pytest.fixture(scope="module")
def client(smollm2):
    from test_server import Server

    from spillover.engine.async_engine import AsyncLLM
    from spillover.llm import LLM
    from spillover.server.app import create_app

    llm = AsyncLLM(LLM(smollm2, progress=False, max_batch_size=2, max_seq_len=2048))
    srv = Server(create_app(llm))
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    srv.stop()
    llm.shutdown()


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _model(client) -> str:
    return client.models.list().data[0].id


def test_required_tool_loop_and_streaming(client):
    model = _model(client)
    kw = dict(model=model, tools=[WEATHER, TIME], max_tokens=64, temperature=0)
    r = client.chat.completions.create(messages=ASK, tool_choice="required", parallel_tool_calls=False, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        WeatherArgs.model_validate_json(call.function.arguments)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > r.usage.prompt_tokens

    stream = client.chat.completions.create(messages=ASK, tool_choice="required", parallel_tool_calls=False,
                                            stream=True, stream_options={"include_usage": True}, **kw)  # fmt: skip
    calls: dict[int, dict] = {}
    pieces, reason, usage = 0, None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            reason = c.finish_reason or reason
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                slot["arguments"] += d.function.arguments or ""
                pieces += 1
    assert reason == "tool_calls" and pieces > 2  # the arguments came in several deltas
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments)
    ]
    assert calls[0]["id"].startswith("call_") and usage.completion_tokens == r.usage.completion_tokens

    # the tool's result goes back; the final answer is text
    turn2 = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"temperature_c": 18, "sky": "sunny"}),
        },
    ]
    final = client.chat.completions.create(messages=turn2, tool_choice="none", **{**kw, "max_tokens": 24})
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content
    alone = client.chat.completions.create(messages=ASK, tool_choice="none", **{**kw, "max_tokens": 1})
    assert (
        final.usage.prompt_tokens > alone.usage.prompt_tokens + 20
    )  # the call and its result are in the prompt


def test_named_function_and_parallel_calls(client):
    model = _model(client)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                       max_tokens=64, temperature=1.0, seed=3, n=4)  # fmt: skip
    for c in r.choices:
        (call,) = c.message.tool_calls
        assert call.function.name == "get_weather" and c.finish_reason == "tool_calls"
        WeatherArgs.model_validate_json(call.function.arguments)
    r = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=96, temperature=1.0, seed=1, n=4)  # fmt: skip
    for c in r.choices:  # parallel calls allowed: one or more, each well formed
        assert c.message.tool_calls and c.finish_reason in ("tool_calls", "length")
        for call in c.message.tool_calls if c.finish_reason == "tool_calls" else []:
            json.loads(call.function.arguments)


def test_tool_errors_are_400(client):
    model = _model(client)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})  # fmt: skip
    bad = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}},
    }
    with pytest.raises(openai.BadRequestError, match="strin"):
        client.chat.completions.create(model=model, messages=ASK, tools=[bad], tool_choice="required")
