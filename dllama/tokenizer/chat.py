"""Chat templates rendered as transformers' apply_chat_template renders them (jinja2, sandboxed)."""
from __future__ import annotations

from datetime import datetime
from functools import lru_cache

from dllama.errors import DllamaError


class ChatTemplateError(DllamaError, ValueError):
    """The stored chat template cannot render these messages."""


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str):
    """transformers' environment: sandboxed, trim_blocks + lstrip_blocks, loopcontrols, tojson
    that keeps non-ascii text, raise_exception and strftime_now helpers."""
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None


def render_chat(source: str, messages: list[dict], add_generation_prompt: bool, bos_token: str, eos_token: str,
                **extra) -> str:
    import jinja2

    template = compile_template(source)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed: {e}") from None
