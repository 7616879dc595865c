"""jmoe.serve.chat: Hugging Face chat templates rendered in a sandbox."""

import pytest

from jmoe.serve.chat import ChatTemplateError, render_chat

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def test_renders_messages_and_the_generation_prompt():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert render_chat(CHATML, messages, add_generation_prompt=False) == want
    assert render_chat(CHATML, messages) == want + "<|im_start|>assistant\n"


def test_special_tokens_are_passed_in():
    template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    got = render_chat(
        template, [{"role": "user", "content": "x"}], bos_token="<s>", eos_token="</s>"
    )
    assert got == "<s>x</s>"


@pytest.mark.parametrize(
    "template, match",
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}", "chat template failed"),
        ("{{ ''.__class__.__mro__ }}", "chat template failed"),  # the sandbox refuses
    ],
)
def test_template_failures_are_chat_template_errors(template, match):
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(template, [{"role": "user", "content": "x"}])


# Written across lines with block tags on their own lines: `trim_blocks` drops the newline after
# a block tag and `lstrip_blocks` the indentation before it, as templates expect.
CHATML_DEFAULT_SYSTEM = """\
{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Mistral-style: BOS, [INST] turns, eos after each answer, roles checked with raise_exception.
INST = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)


def test_chatml_with_block_tags_on_their_own_lines():
    got = render_chat(CHATML_DEFAULT_SYSTEM, [{"role": "user", "content": "Hi there"}])
    want = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert got == want
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]
    got = render_chat(CHATML_DEFAULT_SYSTEM, messages, add_generation_prompt=False)
    assert got == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"


def test_inst_template_and_its_raise_exception():
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    got = render_chat(INST, messages, bos_token="<s>", eos_token="</s>")
    assert got == "<s>[INST] a [/INST]b</s>[INST] c [/INST]"
    with pytest.raises(ChatTemplateError, match="^Conversation roles must alternate"):
        render_chat(INST, messages[1:], bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match="Only user and assistant roles"):
        render_chat(INST, [messages[0], {"role": "system", "content": "x"}])


def test_tojson_keeps_text_and_key_order_and_takes_json_options():
    tools = [{"name": "météo", "args": {"z": 1, "a": "<b>"}}]
    assert render_chat("{{ tools | tojson }}", [], tools=tools) == (
        '[{"name": "météo", "args": {"z": 1, "a": "<b>"}}]'
    )
    got = render_chat("{{ tools[0]['args'] | tojson(indent=2, sort_keys=true) }}", [], tools=tools)
    assert got == '{\n  "a": "<b>",\n  "z": 1\n}'
    assert render_chat("{{ tools is none }}|{{ documents is none }}", []) == "True|True"


def test_strftime_now_loop_controls_and_generation_blocks():
    import datetime

    got = render_chat("{{ strftime_now('%Y-%m') }}", [])
    assert got == datetime.datetime.now().strftime("%Y-%m")
    messages = [{"role": "user", "content": c} for c in "abc"]
    template = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"  # noqa: E501
    assert render_chat(template, messages) == "ab"
    template = "{% for m in messages %}{% if m.content == 'b' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}"  # noqa: E501
    assert render_chat(template, messages) == "ac"
    template = (
        "{% for m in messages %}[{% generation %}{{ m.content }}{% endgeneration %}]{% endfor %}"  # noqa: E501
    )
    assert render_chat(template, messages) == "[a][b][c]"
