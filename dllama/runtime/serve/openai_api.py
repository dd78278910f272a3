"""The OpenAI wire format: request schemas, error bodies and response objects.

Requests are parsed by pydantic models declared here (docs/API.md, "Parameters"): fields this
server does not know are accepted and ignored (the app lists them once in its log); a known field
of the wrong type or out of range is a 400 with the OpenAI error body
{"error": {"message", "type", "param", "code"}} naming it in `param`.
"""
from __future__ import annotations

import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Sequence

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from dllama.errors import DllamaError
from dllama.runtime.sampler import MAX_TOP_LOGPROBS, Sampling, TokenLogprob

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
# Request schemas

MAX_LOGIT_BIAS = 1024               # entries in one logit_bias
MAX_COMPLETION_LOGPROBS = 5         # /v1/completions' logprobs, as OpenAI
MESSAGE_ROLES = ("system", "user", "assistant", "developer", "tool")
TOOL_CHOICES = ("none", "auto", "required")


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _wrong_type(expected: str, value: Any) -> PydanticCustomError:
    return PydanticCustomError("invalid_type", "must be {expected}, got {got}",
                               {"expected": expected, "got": _type_name(value)})


def _text_content(value: Any) -> str | None:
    """A message's content: a string, or text parts joined (this model reads text only)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise PydanticCustomError("unsupported_value", "part {index} is not a text part "
                                          "(type text with a string text): this model reads text only", {"index": i})
            texts.append(part["text"])
        return "".join(texts)
    raise _wrong_type("a string or an array of text parts", value)


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _wrong_type("a string or an array of strings", value)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise PydanticCustomError("invalid_value", "takes at most {most} sequences, got {got}",
                                  {"most": MAX_STOP_SEQUENCES, "got": len(stops)})
    if any(s == "" for s in stops):
        raise PydanticCustomError("invalid_value", "sequences must not be empty strings")
    return stops


def _prompt(value: Any) -> str | list[int]:
    # a string, a one-element array of strings, or an array of token ids (the OpenAI forms)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        if value == "":
            raise PydanticCustomError("empty_prompt", "must not be empty")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    raise _wrong_type("a non-empty string or an array of token ids", value)


def _tool_choice(value: Any) -> str | dict:
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise PydanticCustomError("invalid_value", "must be one of none, auto, required or a named function, "
                                      "got {got}", {"got": repr(value[:40])})
        return value
    name = value.get("function", {}).get("name") if isinstance(value, dict) else None
    if not (isinstance(value, dict) and value.get("type") == "function" and isinstance(name, str)):
        raise _wrong_type('none, auto, required or {"type": "function", "function": {"name": ...}}', value)
    return {"type": "function", "function": {"name": name}}


def _only_one(value: int | None) -> int | None:
    if value is not None and value != 1:
        raise PydanticCustomError("unsupported_value", "must be 1: this server makes one choice per request")
    return value


def _logit_bias(value: dict[str, float] | None) -> dict[int, float] | None:
    if value is None:
        return None
    if len(value) > MAX_LOGIT_BIAS:
        raise PydanticCustomError("invalid_value", "takes at most {most} tokens, got {got}",
                                  {"most": MAX_LOGIT_BIAS, "got": len(value)})
    bias = {}
    for key, b in value.items():
        if not key.isascii() or not key.isdigit():
            raise PydanticCustomError("invalid_value", "keys must be token ids (decimal strings), got {key}",
                                      {"key": repr(key[:40])})
        if not -100.0 <= b <= 100.0:
            raise PydanticCustomError("invalid_value", "values must be in [-100, 100], got {got}", {"got": b})
        bias[int(key)] = b
    return bias


class _Schema(BaseModel):
    # strict: "5" is not an integer and true is not 1; NaN and infinities are not numbers
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


def _arguments(value: Any) -> str | dict:
    if not isinstance(value, (str, dict)):
        raise _wrong_type("a JSON string", value)
    return value


class FunctionCall(_Schema):
    name: str
    arguments: Annotated[Any, BeforeValidator(_arguments)]


class ToolCall(_Schema):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Schema):
    role: Literal[MESSAGE_ROLES]
    content: Annotated[str | None, BeforeValidator(_text_content)] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None      # assistant turns that called tools
    tool_call_id: str | None = None               # a tool's answer: the call it answers

    def template_dict(self) -> dict:
        """What the chat template sees (Hugging Face's message dicts)."""
        message = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(_Schema):
    include_usage: bool | None = None


class JsonSchemaFormat(_Schema):
    name: str
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Schema):
    type: Literal["function"]
    function: FunctionDefinition


class _GenerationFields(_Schema):
    """The fields both generation endpoints take."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")  # extra: listed in the log

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)
    repeat_last_n: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_logit_bias)] = None
    seed: int | None = Field(None, ge=0, lt=2 ** 64)
    stop: Annotated[Any, BeforeValidator(_stop)] = None
    n: Annotated[int | None, Field(ge=1), AfterValidator(_only_one)] = None
    user: str | None = None
    reasoning_effort: str | None = None       # accepted and ignored: these models do not reason on demand


class ChatRequest(_GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Annotated[Any, BeforeValidator(_tool_choice)] = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_GenerationFields):
    prompt: Annotated[Any, BeforeValidator(_prompt)]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int | None, Field(ge=1), AfterValidator(_only_one)] = None


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, before tokenization. The structured-output and tool fields are passed
    through in OpenAI's shapes, validated by the schemas above (ResponseFormat, Tool) and with the
    fields they do not know dropped."""
    kind: str                                  # "chat" or "completion"
    messages: list[dict] = field(default_factory=list)
    prompt: str | list[int] = ""
    max_tokens: int | None = None              # None: up to the end of the context
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = Sampling()
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    logprobs: bool = False                     # with sampling.top_logprobs: how many alternatives
    response_format: dict | None = None        # {"type", "json_schema": {"name", "schema", "strict"}}
    tools: list[dict] | None = None            # [{"type": "function", "function": {"name", "parameters"...}}]
    tool_choice: str | dict | None = None      # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None
    ignored_fields: tuple[str, ...] = ()       # fields this server does not know, ignored


def _first_error(e: ValidationError) -> ApiError:
    error = e.errors(include_url=False)[0]
    kind, loc, msg = error["type"], error["loc"], error["msg"]
    if kind == "json_invalid":
        return invalid(None, f"the request body is not valid JSON ({msg}): send a JSON object", code="invalid_json")
    if not loc:
        return invalid(None, f"the request body must be a JSON object, got {_type_name(error.get('input'))}",
                       code="invalid_json")
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if kind == "missing":
        return invalid(param, f"'{param}' is required", code="missing_field")
    if kind in ("invalid_type", "invalid_value", "unsupported_value", "empty_prompt"):
        return invalid(param, f"'{param}' {msg}", code=kind)
    if kind.endswith("_type") or kind in ("model_attributes_type", "is_instance_of"):
        return invalid(param, f"'{param}': {msg}, got {_type_name(error.get('input'))}", code="invalid_type")
    return invalid(param, f"'{param}': {msg}", code="invalid_value")


def _validated(schema: type[BaseModel], raw: bytes):
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise _first_error(e) from None


def _check_messages(messages: list[ChatMessage]) -> None:
    if not messages:
        raise invalid("messages", "'messages' must contain at least one message", code="empty_messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            absent = "content" not in m.model_fields_set
            raise invalid(f"{where}.content", f"'{where}.content' is required"
                          + ("" if absent else " (null only for an assistant message with tool_calls)"),
                          code="missing_field" if absent else "invalid_type")
        if m.tool_calls and m.role != "assistant":
            raise invalid(f"{where}.tool_calls", f"'{where}.tool_calls' belongs to assistant messages only")


def _sampling(req: _GenerationFields, top_logprobs: int | None) -> Sampling:
    defaults = Sampling()
    return Sampling(
        temperature=defaults.temperature if req.temperature is None else req.temperature,
        top_p=defaults.top_p if req.top_p is None else req.top_p,
        seed=req.seed,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repeat_penalty=req.repeat_penalty,
        repeat_last_n=defaults.repeat_last_n if req.repeat_last_n is None else req.repeat_last_n,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=req.logit_bias or {},
        top_logprobs=top_logprobs,
    )


def _common(req: _GenerationFields, top_logprobs: int | None) -> dict:
    return dict(
        stop=req.stop or [],
        sampling=_sampling(req, top_logprobs),
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        model=req.model,
        logprobs=top_logprobs is not None,
        ignored_fields=tuple(req.model_extra or ()),
    )


def parse_chat_request(raw: bytes) -> GenerationRequest:
    req = _validated(ChatRequest, raw)
    _check_messages(req.messages)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    if req.response_format is not None and req.response_format.type == "json_schema" \
            and req.response_format.json_schema is None:
        raise invalid("response_format.json_schema", "'response_format.json_schema' is required with type "
                      "json_schema", code="missing_field")
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return GenerationRequest(
        kind="chat", messages=[m.template_dict() for m in req.messages],
        max_tokens=req.max_completion_tokens or req.max_tokens,
        response_format=None if req.response_format is None else req.response_format.model_dump(
            by_alias=True, exclude_none=True),
        tools=None if req.tools is None else [tool.model_dump(exclude_none=True) for tool in req.tools],
        tool_choice=req.tool_choice, parallel_tool_calls=req.parallel_tool_calls, **_common(req, top_logprobs))


def parse_completion_request(raw: bytes) -> GenerationRequest:
    req = _validated(CompletionRequest, raw)
    if req.echo:
        raise invalid("echo", "'echo' is not supported by this server: leave it out or send false",
                      code="unsupported_value")
    if req.suffix:
        raise invalid("suffix", "'suffix' is not supported by this server: leave it out", code="unsupported_value")
    return GenerationRequest(kind="completion", prompt=req.prompt,
                             max_tokens=req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS,
                             **_common(req, req.logprobs))


# OpenAI's default for /v1/completions; chat defaults to the rest of the context
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


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


def completion_body(kind: str, rid: str, model: str, text: str | None, finish_reason: str, use: dict,
                    logprobs: dict | None = None, tool_calls: list[dict] | None = None) -> dict:
    if kind == "chat":
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_envelope(kind, rid, int(time.time()), model, chunk=False), "choices": [choice], "usage": use}


def chunk_body(kind: str, rid: str, created: int, model: str, text: str | None,
               finish_reason: str | None = None, role: bool = False, logprobs: dict | None = None,
               tool_calls: list[dict] | None = None) -> dict:
    if kind == "chat":
        delta = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if tool_calls:  # a delta's calls carry their index (OpenAI's streamed tool_calls)
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(tool_calls)]
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_envelope(kind, rid, created, model, chunk=True), "choices": [choice]}


def logprobs_body(kind: str, entries: Sequence[TokenLogprob], token_text: Callable[[int], str],
                  text_offset: int = 0) -> dict:
    """OpenAI's logprobs object: chat's {"content": [...]} or the completions' parallel arrays."""
    if kind == "chat":
        def item(token: int, logprob: float) -> dict:
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries]}
    texts = [token_text(e.token) for e in entries]
    offsets = list(itertools.accumulate((len(t) for t in texts), initial=text_offset))[:-1]
    return {"tokens": texts, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def usage_chunk_body(kind: str, rid: str, created: int, model: str, use: dict) -> dict:
    return {**_envelope(kind, rid, created, model, chunk=True), "choices": [], "usage": use}


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
