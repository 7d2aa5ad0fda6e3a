"""Chat templates: turn a list of messages into a prompt string, the way transformers renders them.

Templates come with the model (tokenizer_config.json, chat_template.jinja or GGUF metadata) and are
untrusted code, so they run in jinja2's immutable sandbox with the same environment transformers gives
them: `trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now` and a `tojson`
filter that does not escape HTML. Any failure becomes a `ConfigError` with a message the user can act on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from spillover.errors import ConfigError

NO_TEMPLATE_MESSAGE = (
    "This model has no chat template, so chat messages cannot be turned into a prompt. "
    "Pass a raw text prompt instead (e.g. LLM.generate(prompt) rather than LLM.chat(messages)), "
    "or supply a chat template."
)

# Names a message's reasoning may come under; templates read the first one (gpt-oss reads "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _TemplateRaised(Exception):
    """`raise_exception(...)` was called by the template itself."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we just render it."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Unlike jinja's own filter: no HTML escaping, and the json.dumps options are exposed (as in transformers).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """Plain JSON-like data for the sandbox: pydantic models and dataclasses become dicts."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return str(value)


def _prepare_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Drop keys whose value is None (an OpenAI `content=None` must not render as "None") and copy the
    reasoning text under every name templates look for, as transformers does."""
    out = []
    for message in messages:
        message = _plain(message)
        if not isinstance(message, dict):
            raise ConfigError(f"A chat message must be a dict with 'role' and 'content', got {message!r}.")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class ChatTemplate:
    """A compiled chat template. Compile once per model, render per request."""

    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(
                f"The model's chat template is not valid Jinja (line {e.lineno}): {e.message}"
            ) from e
        self.source = source

    def render(
        self,
        messages: Sequence[Any],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        **variables: Any,
    ) -> str:
        """Render `messages` (dicts with "role" and "content"). `variables` are extra template variables,
        e.g. bos_token / eos_token or template options such as `enable_thinking`."""
        if not messages:
            raise ConfigError(
                "Cannot apply a chat template to an empty conversation: give at least one message."
            )
        tools = _plain(tools) if tools is not None else None
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ConfigError(
                "Tools must be JSON schemas (dicts), e.g. {'type': 'function', 'function': {...}}."
            )
        try:
            return self._template.render(
                messages=_prepare_messages(messages),
                tools=tools,
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **_plain(variables),
            )
        except _TemplateRaised as e:
            raise ConfigError(f"The chat template rejected these messages: {e}") from e
        except ConfigError:
            raise
        except Exception as e:  # template code can fail in any way (undefined names, bad types, sandbox)
            raise ConfigError(f"The chat template failed to render: {type(e).__name__}: {e}") from e


def select_template(
    templates: str | Mapping[str, str] | None, tools: Sequence[Any] | None = None, name: str | None = None
) -> str:
    """Pick the template to use: a named one if asked, "tool_use" when tools are given and the model has one,
    else "default". Raises `ConfigError` when the model has none."""
    if isinstance(templates, str):
        if name not in (None, "default"):
            raise ConfigError(f"This model has a single chat template; there is no template named {name!r}.")
        return templates
    if not templates:
        raise ConfigError(NO_TEMPLATE_MESSAGE)
    if name is not None:
        if name not in templates:
            raise ConfigError(
                f"No chat template named {name!r}; this model has: {', '.join(sorted(templates))}."
            )
        return templates[name]
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ConfigError(
        f"This model has several chat templates ({', '.join(sorted(templates))}) and none is named 'default': "
        "choose one by name."
    )


def render_chat_template(
    source: str | None,
    messages: Sequence[Any],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Any] | None = None,
    **variables: Any,
) -> str:
    """One-off render of a template source (compiles it each call; keep a `ChatTemplate` to reuse)."""
    if not source:
        raise ConfigError(NO_TEMPLATE_MESSAGE)
    return ChatTemplate(source).render(
        messages, add_generation_prompt=add_generation_prompt, tools=tools, **variables
    )
