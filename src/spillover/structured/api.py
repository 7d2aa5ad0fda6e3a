"""OpenAI request fields for structured output and tools: their schemas, and what they turn into.

`response_format` ({"type": "text" | "json_object" | "json_schema"}) becomes `SamplingParams.json_schema`;
`tools` / `tool_choice` / `parallel_tool_calls` become a `tools.ToolPlan` (structured/tools.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from spillover.engine.sampling import SamplingParams
from spillover.errors import GrammarError


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JsonSchemaFormat(_Open):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Open):
    name: str
    arguments: str = "{}"  # a JSON text, as OpenAI sends it


class ToolCallIn(_Open):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


# ------------------------------------------------------------------ responses


class FunctionOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionOut


class FunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


# ------------------------------------------------------------------ request -> sampling params


def response_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    """The JSON schema a response_format asks for (None: free text). Raises GrammarError on a bad one."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise GrammarError("response_format json_schema needs json_schema.schema (a JSON schema object)")
    schema = fmt.json_schema.schema_
    if schema is True:
        return {}
    return closed_objects(schema) if fmt.json_schema.strict else schema


def closed_objects(schema: Any) -> Any:
    """OpenAI's strict mode: objects take no properties beyond the listed ones (JSON Schema's default lets
    any others in, which a small model happily fills until max_tokens). A copy; explicit settings stay."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def with_constraint(params: list[SamplingParams], **constraint: Any) -> list[SamplingParams]:
    return [dataclasses.replace(p, **constraint) for p in params]


# ------------------------------------------------------------------ tool calls -> the response


def tool_message(
    plan: Any, text: str, finish: str | None
) -> tuple[str | None, list[ToolCallOut] | None, str | None]:
    """A finished answer under a tool plan -> (content, tool_calls, finish_reason)."""
    from spillover.structured.tools import parse_tool_calls

    content, calls = parse_tool_calls(text, plan.parser().parallel)
    if not calls:  # the parser's content: stripped as when streamed
        return content or "", None, finish
    out = [ToolCallOut(id=i, function=FunctionOut(name=n, arguments=a)) for i, n, a in calls]
    return content, out, "tool_calls" if finish == "stop" else finish


def stream_deltas(events: list[Any]) -> list[dict[str, Any]]:
    """Parser events -> the fields of streamed deltas, as OpenAI streams them: a call's first delta has its
    index, id, type and name (arguments ""), the next ones pieces of its arguments."""
    from spillover.structured.tools import ArgsDelta, CallStart, ContentDelta

    out: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, ContentDelta):
            out.append({"content": e.text})
        elif isinstance(e, CallStart):
            fn = FunctionDelta(name=e.name, arguments="")
            out.append({"tool_calls": [ToolCallDelta(index=e.index, id=e.id, type="function", function=fn)]})
        elif isinstance(e, ArgsDelta):
            out.append(
                {"tool_calls": [ToolCallDelta(index=e.index, function=FunctionDelta(arguments=e.text))]}
            )
    return out
