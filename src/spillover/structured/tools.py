"""Tool calling: tools rendered through the model's chat template, calls parsed back out of the answer (also
incrementally, for streaming), and with tool_choice "required" or a named function a grammar that forces
well-formed calls whose arguments match the function's JSON schema.

Template families (detected from the template's text):
- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` per call (Qwen2.5, Qwen3, Hermes,
  SmolLM3). Also the fallback for templates that know no tools (SmolLM2, Gemma 3): the tools are described
  in the system message the way Qwen2.5's template does, earlier calls are written back as `<tool_call>`
  blocks and tool results are sent as a user turn of `<tool_response>` blocks.
- llama3: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`; several joined by "; ".
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
The parser accepts any family's wrapping, and a bare `{"name": ...}` object at the start of an answer.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from spillover.errors import ConfigError
from spillover.structured.api import closed_objects
from spillover.structured.grammar import JSON_OPTIONS


@dataclass(frozen=True)
class ToolFormat:
    name: str  # "hermes" | "llama3" | "mistral"
    native: bool  # the chat template renders tools, calls and results itself
    args_key: str = "arguments"


def detect_format(template: str | None) -> ToolFormat:
    src = template or ""
    native = "tools" in src
    if "[TOOL_CALLS]" in src:
        return ToolFormat("mistral", native)
    if "<tool_call>" in src:
        return ToolFormat("hermes", native)
    if "<|python_tag|>" in src or "ipython" in src:
        return ToolFormat("llama3", native, "parameters")
    return ToolFormat("hermes", False)  # no tool support: described in the system message


# ------------------------------------------------------------------ the plan of one request


@dataclass
class ToolPlan:
    fmt: ToolFormat
    tools: list[dict[str, Any]]  # OpenAI tool dicts {"type": "function", "function": {...}}
    choice: str  # "auto" | "none" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Calls are parsed out of the answer."""
        return bool(self.tools) and self.choice != "none"

    def grammar(self) -> str | None:
        """A Lark grammar (llguidance) that admits only calls, for "required" and a named function."""
        if self.choice not in ("required", "named"):
            return None
        fns = [t["function"] for t in self.tools if self.named is None or t["function"]["name"] == self.named]
        bodies = []
        for i, fn in enumerate(fns):
            params = closed_objects(fn.get("parameters") or {"type": "object", "properties": {}})
            schema = {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, self.fmt.args_key: params},
                "required": ["name", self.fmt.args_key],
                "additionalProperties": False,
                "x-guidance": JSON_OPTIONS,
            }
            bodies.append(f"c{i}: %json {json.dumps(schema)}")
        many = self.parallel and self.choice == "required"
        call = " | ".join(f"c{i}" for i in range(len(fns)))
        if self.fmt.name == "mistral":
            start = 'start: "[" call (", " call)* "]"' if many else 'start: "[" call "]"'
            rules = [start, f"call: {call}"]
        elif self.fmt.name == "llama3":
            rules = ['start: call ("; " call)*' if many else "start: call", f"call: {call}"]
        else:
            rules = ['start: call ("\\n" call)*' if many else "start: call",
                     f'call: "<tool_call>\\n" ({call}) "\\n</tool_call>"']  # fmt: skip
        return "\n".join(rules + bodies) + "\n"

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.parallel and self.choice != "named")


def plan_tools(
    template: str | None,
    tools: Sequence[Any] | None,
    tool_choice: Any,
    parallel: bool = True,
) -> ToolPlan:
    """The request's plan. `tools`: OpenAI tool dicts (or pydantic models); `tool_choice`: "auto", "none",
    "required", {"type": "function", "function": {"name": ...}} (or its model), None (auto with tools)."""
    tools = [_plain(t) for t in tools or []]
    if hasattr(tool_choice, "model_dump"):
        tool_choice = tool_choice.model_dump()
    named = None
    if isinstance(tool_choice, dict):
        named = (tool_choice.get("function") or {}).get("name")
        choice = "named"
        if named not in {t["function"]["name"] for t in tools}:
            raise ConfigError(f"tool_choice names the function {named!r}, which is not among the tools")
    else:
        choice = tool_choice or ("auto" if tools else "none")
    if choice in ("required", "named") and not tools:
        raise ConfigError(f"tool_choice {choice!r} needs tools")
    return ToolPlan(detect_format(template), tools, choice, named, parallel)


def _plain(x: Any) -> Any:
    return x.model_dump(by_alias=True, exclude_none=True) if hasattr(x, "model_dump") else dict(x)


# ------------------------------------------------------------------ messages -> the template


_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def render_messages(
    messages: Sequence[dict[str, Any]], plan: ToolPlan
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template. Messages are dicts with role, content, and optionally
    tool_calls (OpenAI's, arguments as JSON text) and tool_call_id. Templates with tool support get the tools
    and the calls with their arguments as objects (as transformers documents); the others get text."""
    offer = plan.tools if plan.choice != "none" else []
    names = {
        c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or [] if c.get("id")
    }
    if plan.fmt.native:
        out = []
        for m in messages:
            m = {k: v for k, v in m.items() if v is not None}
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _args(c["function"])}}
                                   for c in m["tool_calls"]]  # fmt: skip
            if m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in names:
                m["name"] = names[m["tool_call_id"]]
            out.append(m)
        return out, (offer or None)
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': _args(c['function'])})}"
                      "\n</tool_call>" for c in m["tool_calls"]]  # fmt: skip
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool"):  # parallel results: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": True})
        else:
            out.append({"role": role, "content": content, **({"name": m["name"]} if m.get("name") else {})})
    out = [{k: v for k, v in m.items() if k != "_tool"} for m in out]
    if offer:
        text = _SYSTEM.format(tools="\n".join(json.dumps(t) for t in offer))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def _args(fn: dict[str, Any]) -> Any:
    a = fn.get("arguments")
    if isinstance(a, str):
        try:
            return json.loads(a) if a.strip() else {}
        except ValueError:
            return a
    return a if a is not None else {}


# ------------------------------------------------------------------ answer -> calls (incremental)


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStart:
    index: int
    id: str
    name: str


@dataclass
class ArgsDelta:
    index: int
    text: str


_STARTS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")
_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_BARE = ('{"name":', '[{"name":')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _close(s: str, i: int) -> int | None:
    """The index after the JSON object/array opening at s[i], or None if it is not closed yet."""
    depth, in_str, esc = 0, False, False
    for j in range(i, len(s)):
        c = s[j]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


@dataclass
class _Call:
    id: str
    name: str
    sent: int = 0  # characters of the arguments already sent


@dataclass
class ToolCallParser:
    """Feed the answer's text as it comes (`push`), then `finish()`; both return events: ContentDelta,
    CallStart (id and name) and ArgsDelta (the next characters of a call's arguments, as generated). Text
    before the first call is content (surrounding whitespace dropped); everything after the first call
    marker belongs to calls. `assemble` turns the events into (content, calls)."""

    parallel: bool = True
    buf: str = ""
    zone: int | None = None  # where the calls begin
    sent: int = 0  # content characters sent
    calls: list[_Call] = field(default_factory=list)

    def push(self, text: str) -> list[Any]:
        self.buf += text
        return self._step(final=False)

    def finish(self) -> list[Any]:
        events = self._step(final=True)
        if self.zone is not None and not self.calls:  # a marker but no call in it: keep the text
            events.append(ContentDelta(self.buf[max(self.sent, self.zone) :].strip()))
        return [e for e in events if not isinstance(e, ContentDelta) or e.text]

    def _step(self, final: bool) -> list[Any]:
        events: list[Any] = []
        if self.zone is None:
            zone, hold = self._find_zone()
            end = zone if zone is not None else len(self.buf) - (0 if final else hold)
            text = self.buf[:end]
            start = max(self.sent, len(text) - len(text.lstrip()))
            stop = len(text.rstrip())
            if stop > start:
                events.append(ContentDelta(self.buf[start:stop]))
                self.sent = stop
            if zone is None:
                return events
            self.zone = zone
        return events + self._scan(final)

    def _find_zone(self) -> tuple[int | None, int]:
        b = self.buf
        found = [i for i in (b.find(m) for m in _STARTS) if i >= 0]
        hold = max((k for m in _STARTS for k in range(1, len(m)) if b.endswith(m[:k])), default=0)
        head = b.lstrip()
        if self.sent == 0 and head:  # a bare call object at the start of the answer
            compact = re.sub(r"\s+", "", head[:48])
            if any(compact.startswith(p) for p in _BARE):
                found.append(len(b) - len(head))
            elif any(p.startswith(compact) for p in _BARE):
                hold = len(b)
        return (min(found) if found else None), hold

    def _scan(self, final: bool) -> list[Any]:
        events: list[Any] = []
        b, i, k = self.buf, self.zone, 0
        while (k == 0 or self.parallel) and (j := b.find("{", i)) >= 0:
            end = _close(b, j)
            m = _NAME.match(b, j)
            if m is None and end is None:
                break
            name, a0 = None, None
            if m is not None:
                name = json.loads(f'"{m.group(1)}"')
                a = _ARGS.match(b, m.end())
                a0 = a.end() if a else None
            elif end is not None:  # a complete object whose name is not first: parse it whole
                try:
                    obj = json.loads(b[j:end])
                except ValueError:
                    break
                if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                    break
                name = obj["name"]
            if k == len(self.calls):
                self.calls.append(_Call(new_call_id(), name))
                events.append(CallStart(k, self.calls[k].id, name))
            call = self.calls[k]
            args = self._args(b, j, end, a0)
            if args is not None and len(args) > call.sent and (end is not None or final or b[a0] in "{["):
                events.append(ArgsDelta(k, args[call.sent :]))
                call.sent = len(args)
            if end is None:
                break
            i, k = end, k + 1
        return events

    @staticmethod
    def _args(b: str, j: int, end: int | None, a0: int | None) -> str | None:
        """The arguments text so far: the object as generated (streamed as it grows), or, for arguments
        sent as a JSON string or after the name-less path, the value once the call object is complete."""
        if a0 is not None and a0 < len(b) and b[a0] in "{[":
            close = _close(b, a0)
            return b[a0 : close if close is not None else len(b)]
        if end is None:
            return None
        try:
            obj = json.loads(b[j:end])
        except ValueError:
            return None
        val = obj.get("arguments", obj.get("parameters", {})) if isinstance(obj, dict) else {}
        return val if isinstance(val, str) else json.dumps(val)


def assemble(events: Sequence[Any]) -> tuple[str | None, list[tuple[str, str, str]]]:
    """Events -> (content or None, [(id, name, arguments)])."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, CallStart):
            calls[e.index] = [e.id, e.name, ""]
        elif isinstance(e, ArgsDelta):
            calls[e.index][2] += e.text
    return (content or None), [tuple(c) for _, c in sorted(calls.items())]


def parse_tool_calls(text: str, parallel: bool = True) -> tuple[str | None, list[tuple[str, str, str]]]:
    """The whole answer at once: (content or None, [(id, name, arguments JSON text)])."""
    p = ToolCallParser(parallel)
    return assemble(p.push(text) + p.finish())
