"""The OpenAI wire format: request validation, error bodies and response objects.

Requests are checked against one table of fields per endpoint; anything else is a 400 with
the OpenAI error body {"error": {"message", "type", "param", "code"}} (docs/API.md).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from dllama.errors import DllamaError
from dllama.runtime.sampler import Sampling

MAX_STOP_SEQUENCES = 4


class ApiError(DllamaError):
    """A request that ends in an OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------
# Field checks: each takes (name, value) and returns the normalised value or raises ApiError

def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _wrong_type(name: str, value: Any, expected: str) -> ApiError:
    return invalid(name, f"'{name}' must be {expected}, got {_type_name(value)}", code="invalid_type")


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _wrong_type(name, value, "a string")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(name, value, "a boolean")
    return value


def _integer(name: str, value: Any) -> int:
    # bool is an int subclass in Python, but `true` is not an integer in JSON
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(name, value, "an integer")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, value, "a number")
    return float(value)


def _in_range(check: Callable[[str, Any], Any], low: float, high: float, *, open_low: bool = False):
    def checked(name: str, value: Any):
        v = check(name, value)
        if v < low or v > high or (open_low and v == low):
            bracket = "(" if open_low else "["
            raise invalid(name, f"'{name}' must be in {bracket}{low}, {high}], got {value}")
        return v
    return checked


def _positive_int(name: str, value: Any) -> int:
    v = _integer(name, value)
    if v < 1:
        raise invalid(name, f"'{name}' must be at least 1, got {v}")
    return v


def _optional(check: Callable[[str, Any], Any]):
    return lambda name, value: None if value is None else check(name, value)


def _stop(name: str, value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong_type(name, value, "a string or an array of strings")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid(name, f"'{name}' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise invalid(name, f"'{name}' sequences must not be empty strings")
    return stops


def _only_one_choice(name: str, value: Any) -> int:
    if _integer(name, value) != 1:
        raise invalid(name, f"'{name}' must be 1: one generation runs at a time on this server",
                      code="unsupported_value")
    return 1


def _only_neutral(neutral: Any, check: Callable[[str, Any], Any]):
    # OpenAI fields that chat UIs send at their neutral value: accepted only at that value
    def checked(name: str, value: Any):
        if check(name, value) != neutral:
            raise invalid(name, f"'{name}' is not supported by this server: leave it out or send {json.dumps(neutral)}",
                          code="unsupported_value")
        return neutral
    return checked


def _object(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _wrong_type(name, value, "an object")
    return value


def _stream_options(name: str, value: Any) -> bool:
    if not isinstance(value, dict):
        raise _wrong_type(name, value, "an object")
    unknown = set(value) - {"include_usage"}
    if unknown:
        raise invalid(f"{name}.{sorted(unknown)[0]}",
                      f"unknown field '{name}.{sorted(unknown)[0]}': only include_usage is supported",
                      code="unknown_field")
    return _boolean(f"{name}.include_usage", value.get("include_usage", False))


MESSAGE_ROLES = ("system", "user", "assistant", "developer", "tool")


def _message_content(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    # content parts: only text parts make sense for a text-only model
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for i, part in enumerate(value):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{name}[{i}]",
                              f"'{name}[{i}]' must be a text part {{\"type\": \"text\", \"text\": \"...\"}}",
                              code="unsupported_value")
            texts.append(part["text"])
        return "".join(texts)
    raise _wrong_type(name, value, "a string or an array of text parts")


def _messages(name: str, value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise _wrong_type(name, value, "an array of messages")
    if not value:
        raise invalid(name, f"'{name}' must contain at least one message", code="empty_messages")
    messages = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise _wrong_type(where, msg, "an object")
        unknown = set(msg) - {"role", "content", "name"}
        if unknown:
            key = sorted(unknown)[0]
            raise invalid(f"{where}.{key}", f"unknown field '{where}.{key}': messages take role, content and name",
                          code="unknown_field")
        role = msg.get("role")
        if role not in MESSAGE_ROLES:
            raise invalid(f"{where}.role", f"'{where}.role' must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
        if "content" not in msg:
            raise invalid(f"{where}.content", f"'{where}.content' is required", code="missing_field")
        message = {"role": role, "content": _message_content(f"{where}.content", msg["content"])}
        if "name" in msg:
            message["name"] = _string(f"{where}.name", msg["name"])
        messages.append(message)
    return messages


def _prompt(name: str, value: Any) -> str | list[int]:
    # a string, a one-element array of strings, or an array of token ids (the OpenAI forms)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if value == "":
            raise invalid(name, f"'{name}' must not be empty", code="empty_prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    raise _wrong_type(name, value, "a non-empty string or an array of token ids")


@dataclass(frozen=True)
class Field:
    check: Callable[[str, Any], Any]
    default: Any = None
    required: bool = False


SAMPLING_FIELDS = {
    "model": Field(_optional(_string)),
    "stream": Field(_optional(_boolean), False),
    "stream_options": Field(_optional(_stream_options), False),
    "temperature": Field(_optional(_in_range(_number, 0.0, 2.0)), 1.0),
    "top_p": Field(_optional(_in_range(_number, 0.0, 1.0, open_low=True)), 1.0),
    "max_tokens": Field(_optional(_positive_int)),
    "stop": Field(_optional(_stop), []),
    "seed": Field(_optional(_integer)),
    "n": Field(_optional(_only_one_choice), 1),
    "user": Field(_optional(_string)),
    "presence_penalty": Field(_optional(_only_neutral(0.0, _number)), 0.0),
    "frequency_penalty": Field(_optional(_only_neutral(0.0, _number)), 0.0),
    "logit_bias": Field(_optional(_only_neutral({}, _object)), {}),
    "logprobs": Field(_optional(_only_neutral(False, _boolean)), False),
}

CHAT_FIELDS = {
    **SAMPLING_FIELDS,
    "messages": Field(_messages, required=True),
    "max_completion_tokens": Field(_optional(_positive_int)),
}

COMPLETION_FIELDS = {
    **SAMPLING_FIELDS,
    "prompt": Field(_prompt, required=True),
}

# OpenAI's default for /v1/completions; chat defaults to the rest of the context
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


def parse_json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(None, f"the request body is not valid JSON ({e}): send a JSON object",
                      code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_json")
    return body


def _check_fields(body: dict, fields: dict[str, Field]) -> dict[str, Any]:
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise invalid(unknown[0], f"unknown field '{unknown[0]}': supported fields are {', '.join(sorted(fields))}",
                      code="unknown_field")
    values = {}
    for name, spec in fields.items():
        if name not in body:
            if spec.required:
                raise invalid(name, f"'{name}' is required", code="missing_field")
            values[name] = spec.default
            continue
        checked = spec.check(name, body[name])
        values[name] = spec.default if checked is None else checked
    return values


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, before tokenization."""
    kind: str                                  # "chat" or "completion"
    messages: list[dict] = field(default_factory=list)
    prompt: str | list[int] = ""
    max_tokens: int | None = None              # None: up to the end of the context
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = Sampling()
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


def _common(values: dict) -> dict:
    return dict(
        stop=values["stop"],
        sampling=Sampling(temperature=values["temperature"], top_p=values["top_p"], seed=values["seed"]),
        stream=values["stream"],
        include_usage=values["stream_options"],
        model=values["model"],
    )


def parse_chat_request(raw: bytes) -> GenerationRequest:
    values = _check_fields(parse_json_object(raw), CHAT_FIELDS)
    max_tokens = values["max_completion_tokens"] or values["max_tokens"]
    return GenerationRequest(kind="chat", messages=values["messages"], max_tokens=max_tokens, **_common(values))


def parse_completion_request(raw: bytes) -> GenerationRequest:
    values = _check_fields(parse_json_object(raw), COMPLETION_FIELDS)
    max_tokens = values["max_tokens"] or COMPLETIONS_DEFAULT_MAX_TOKENS
    return GenerationRequest(kind="completion", prompt=values["prompt"], max_tokens=max_tokens, **_common(values))


# --------------------------------------------------------------------------------------------
# Response objects

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    # cached_tokens: prompt tokens whose KV cache was reused from the previous request
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _envelope(kind: str, rid: str, created: int, model: str, chunk: bool) -> dict:
    obj = {"chat": "chat.completion", "completion": "text_completion"}[kind]
    if chunk and kind == "chat":
        obj = "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model}


def completion_body(kind: str, rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**_envelope(kind, rid, int(time.time()), model, chunk=False), "choices": [choice], "usage": use}


def chunk_body(kind: str, rid: str, created: int, model: str, text: str | None,
               finish_reason: str | None = None, role: bool = False) -> dict:
    if kind == "chat":
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**_envelope(kind, rid, created, model, chunk=True), "choices": [choice]}


def usage_chunk_body(kind: str, rid: str, created: int, model: str, use: dict) -> dict:
    return {**_envelope(kind, rid, created, model, chunk=True), "choices": [], "usage": use}


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
