"""Chat templates render exactly what transformers' apply_chat_template renders, and fail with clear errors."""

from __future__ import annotations

from datetime import datetime

import pytest

from spillover.errors import ConfigError
from spillover.loading.chat_template import ChatTemplate, render_chat_template, select_template
from spillover.loading.tokenizer import Tokenizer

CHATS = {
    "no_system": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi! 👋"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write\n\tcode:\n```py\nprint('x')\n```"},
    ],
    "no_system_multi_turn": [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "<|im_start|> in text"},
    ],
}

# Exercises the environment transformers gives templates: tojson with options, namespace, loop controls,
# {% generation %}, raise_exception, bos/eos variables, tools and extra variables.
FEATURES_TEMPLATE = """
{{- bos_token }}
{%- set ns = namespace(n=0) %}
{%- if tools %}Tools: {{ tools | tojson }}
{{ tools[0] | tojson(indent=2) }}
{% endif %}
{%- for m in messages %}
  {%- if m.role == 'skip' %}{% continue %}{% endif %}
  {%- set ns.n = ns.n + 1 %}
  {%- if m.role == 'assistant' %}{% generation %}[A] {{ m.content }}{{ eos_token }}{% endgeneration %}
  {%- else %}[{{ m.role }}] {{ m.content | trim }}
  {% endif %}
  {%- if m.role == 'stop' %}{% break %}{% endif %}
{%- endfor %}
n={{ ns.n }} think={{ enable_thinking | default('unset') }} keys={{ messages[0] | tojson(sort_keys=True) }}
{%- if add_generation_prompt %}
[A]{% endif %}
"""


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CHATS))
def test_smollm2_template_like_transformers(smol, smol_ref, name, add_generation_prompt):
    chat = CHATS[name]
    ours = smol.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    theirs = smol_ref.apply_chat_template(chat, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    ids = smol_ref.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)["input_ids"]
    assert smol.encode_chat(chat, add_generation_prompt=add_generation_prompt) == ids


def test_smollm2_template_shape(smol):
    prompt = smol.apply_chat_template(CHATS["no_system"])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_features_like_transformers(smol, smol_ref, add_generation_prompt):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": 'Weather <in> a city & "quotes", café',
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    chat = [
        {"role": "user", "content": "  Hi é  ", "name": None},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "Hello"},
        {"role": "stop", "content": "last"},
        {"role": "user", "content": "never shown"},
    ]
    for kwargs in ({}, {"enable_thinking": False}):
        ours = smol.apply_chat_template(
            chat, add_generation_prompt, tools, chat_template=FEATURES_TEMPLATE, **kwargs
        )
        theirs = smol_ref.apply_chat_template(
            chat,
            tools=tools,
            chat_template=FEATURES_TEMPLATE,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
        assert ours == theirs
    assert "café" in ours and '<in> a city & \\"quotes\\"' in ours  # tojson: no HTML escaping, no \\u escapes
    assert "never shown" not in ours and "hidden" not in ours and "None" not in ours


def test_strftime_now_and_special_token_variables():
    out = render_chat_template(
        "{{ bos_token }}{{ strftime_now('%Y') }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}",
        [{"role": "user", "content": "x"}],
        bos_token="<s>",
        eos_token="</s>",
    )
    assert out in (f"<s>{datetime.now().year}x</s>", f"<s>{datetime.now().year - 1}x</s>")


def test_raise_exception_becomes_config_error():
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user turn') }}{% endif %}"
    with pytest.raises(ConfigError, match="Conversation must start with a user turn"):
        render_chat_template(template, [{"role": "assistant", "content": "hi"}])
    assert render_chat_template(template, [{"role": "user", "content": "hi"}]) == ""


def test_no_template_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="no chat template.*raw text prompt"):
        render_chat_template(None, [{"role": "user", "content": "hi"}])
    with pytest.raises(ConfigError, match="raw text prompt"):
        select_template(None)


def test_bad_templates_and_messages():
    with pytest.raises(ConfigError, match="not valid Jinja"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ConfigError, match="failed to render"):
        render_chat_template("{{ messages[0].content + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ConfigError, match="empty conversation"):
        render_chat_template("x", [])
    with pytest.raises(ConfigError, match="dict"):
        render_chat_template("x", ["just a string"])


def test_sandbox_blocks_python_internals():
    with pytest.raises(ConfigError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])


def test_select_template_by_tools_and_name():
    templates = {"default": "D", "tool_use": "T", "rag": "R"}
    assert select_template(templates) == "D"
    assert select_template(templates, tools=[{"type": "function"}]) == "T"
    assert select_template(templates, name="rag") == "R"
    assert select_template("S") == "S"
    with pytest.raises(ConfigError, match="no_such"):
        select_template(templates, name="no_such")
    with pytest.raises(ConfigError, match="none is named 'default'"):
        select_template({"rag": "R"})


def test_gguf_named_templates(smol_meta):
    named = {"tokenizer.chat_template": "D{{ messages[0].content }}", "tokenizer.chat_template.tool_use": "T"}
    tok = Tokenizer.from_gguf_metadata({**smol_meta, **named})
    assert tok.chat_template == {"default": "D{{ messages[0].content }}", "tool_use": "T"}
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "function"}]) == "T"


def test_pydantic_like_and_reasoning_messages():
    class Msg:
        def __init__(self, **kw):
            self.kw = kw

        def model_dump(self):
            return self.kw

    template = "{% for m in messages %}{{ m.role }}:{{ m.content }}|{{ m.reasoning_content }}|{{ m.thinking }};{% endfor %}"
    out = render_chat_template(template, [Msg(role="assistant", content="A", reasoning="R", tool_calls=None)])
    assert out == "assistant:A|R|R;"
