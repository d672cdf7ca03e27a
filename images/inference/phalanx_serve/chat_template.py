"""Turning chat messages into one prompt string.

The template is Jinja, as in Hugging Face tokenizers: taken from ``--chat-template`` (a file or
the template text), else from the model's ``tokenizer_config.json``, else ``DEFAULT_TEMPLATE``.
It is rendered in Jinja's sandbox because templates ship with downloaded models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message.role }}|>\n{{ message.content }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    pass


class ChatTemplate:
    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.source = source
        self.template = env.from_string(source)

    @classmethod
    def resolve(cls, option: str | None, from_model: str | None) -> ChatTemplate:
        if option:
            path = Path(option)
            return cls(path.read_text() if path.is_file() else option)
        return cls(from_model or DEFAULT_TEMPLATE)

    def render(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool, **extra: Any
    ) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **extra
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, AttributeError) as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


def _raise(message: str) -> None:
    raise ChatTemplateError(message)
