"""Render OpenAI chat messages to one prompt string with a jinja2 chat template.

Triton's generate endpoints take ``text_input``, a single string, so the chat template that the
model was trained with has to be applied here (LiteLLM's built-in ``triton/`` provider joins
the messages without one). Templates follow the Hugging Face ``chat_template`` conventions:
variables ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, a
``raise_exception(msg)`` helper, ``trim_blocks`` and ``lstrip_blocks`` on. They are rendered in
jinja2's immutable sandbox, as Hugging Face does, since a template is configuration text.

Template spec (``TRIAGE_TRITON_CHAT_TEMPLATE`` or a deployment override): ``None`` or
``"chatml"`` selects the built-in ChatML template; a string containing ``{{`` or ``{%`` is the
template itself; anything else is a path to a template file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}

# OpenAI's "developer" role is the system role of newer models; templates only know "system".
ROLE_ALIASES = {"developer": "system"}


class ChatTemplateError(ValueError):
    """The template could not be loaded or rendered, or a message cannot be rendered."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt for ``messages`` (OpenAI format) with the assistant turn opened."""
        template = _compile(self.source)
        try:
            return template.render(
                messages=normalize_messages(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


def load_template_source(spec: str | None) -> str:
    """The template text for a spec: built-in name, template string, or file path."""
    if spec is None or spec.strip() == "":
        return CHATML_TEMPLATE
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if "{{" in spec or "{%" in spec:
        return spec
    return _read_template_file(spec)


@lru_cache(maxsize=32)
def _read_template_file(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ChatTemplateError(f"cannot read chat template file {path!r}: {exc}") from exc


def chat_template(spec: str | None, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    source = load_template_source(spec)
    _compile(source)  # fail at configuration time on a syntax error
    return ChatTemplate(source=source, bos_token=bos_token, eos_token=eos_token)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages with string ``content``: text parts joined, ``None`` as "", roles aliased.

    Non-text content parts (images, audio, files) cannot go into ``text_input``: they raise.
    """
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{index}] has no role")
        normalized = dict(message)
        normalized["role"] = ROLE_ALIASES.get(role, role)
        normalized["content"] = _content_text(message.get("content"), index)
        out.append(normalized)
    return out


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(
                    f"messages[{index}].content: part of type {kind!r} is not supported "
                    "(this provider sends text only)"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise ChatTemplateError(f"messages[{index}].content must be a string or a list of parts")


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error (line {exc.lineno}): {exc}") from exc
