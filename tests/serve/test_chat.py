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
