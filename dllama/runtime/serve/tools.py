"""What a chat answer must look like: `response_format` and `tools` / `tool_choice` (docs/API.md).

A request's tools reach the model through its chat template when the template takes them (the
`tools` variable of Hugging Face templates, Hermes / Qwen style `<tool_call>` answers). A template
that ignores tools (SmolLM2's, TinyLlama's) gets them as llama.cpp's server does for generic
models: the tool list and a JSON answer format in the system prompt, earlier tool calls and tool
results written into the messages as JSON, and the answer constrained by the grammar engine to
{"tool_call": {"name", "arguments"}} (or, with tool_choice "auto", that or {"response": text}).

    plan = plan_answer(tokenizer.chat_template, messages, tools, tool_choice, response_format)
    prompt = tokenizer.render_chat(plan.messages, **plan.template_vars)   # generation constrained by plan.grammar
    content, calls = plan.parse(text)            # calls: OpenAI tool_calls, [] for a plain answer
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from dllama.runtime.serve.openai_api import invalid
from dllama.runtime.structured import JSON_LAYOUT, GrammarError, json_schema_grammar, lark_grammar

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

GENERIC_INSTRUCTION = ("Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` "
                       "reply to the user's request")
GENERIC_REQUIRED_INSTRUCTION = "Respond in JSON format with `tool_call` (a request to call one of the tools)"


def _plain(value: Any) -> Any:
    """A parsed request schema (openai_api's pydantic models) as the JSON it came from."""
    return value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value


def _object(name: str, value: Any) -> dict:
    value = _plain(value)
    if not isinstance(value, dict):
        raise invalid(name, f"'{name}' must be an object", code="invalid_type")
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise invalid(name, f"'{name}' must be a string", code="invalid_type")
    return value


# --------------------------------------------------------------------------------------------
# Request fields, past what openai_api's schemas check: each takes (name, value) and returns the
# normalised value or raises a 400 (a schema the grammar engine cannot compile, two tools of one name)

def check_response_format(name: str, value: Any) -> dict | None:
    fmt = _object(name, value)
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMATS:
        raise invalid(f"{name}.type", f"'{name}.type' must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    spec = _object(f"{name}.json_schema", fmt.get("json_schema"))
    schema = spec.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise invalid(f"{name}.json_schema.schema", f"'{name}.json_schema.schema' must be a JSON schema object",
                       code="invalid_type")
    _compiles(f"{name}.json_schema.schema", schema)
    return {"type": "json_schema", "json_schema": {"name": spec.get("name"), "schema": schema,
                                                   "strict": bool(spec.get("strict", False))}}


def check_tools(name: str, value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise invalid(name, f"'{name}' must be an array of tools", code="invalid_type")
    tools, seen = [], set()
    for i, tool in enumerate(value):
        where = f"{name}[{i}]"
        tool = _object(where, tool)
        if tool.get("type", "function") != "function":
            raise invalid(f"{where}.type", f"'{where}.type' must be \"function\"", code="unsupported_value")
        function = _object(f"{where}.function", tool.get("function"))
        fname = function.get("name")
        if not isinstance(fname, str) or not FUNCTION_NAME.match(fname):
            raise invalid(f"{where}.function.name", f"'{where}.function.name' must be 1-64 letters, digits, _ . or -")
        if fname in seen:
            raise invalid(f"{where}.function.name", f"two tools are named {fname!r}")
        seen.add(fname)
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise invalid(f"{where}.function.parameters", f"'{where}.function.parameters' must be a JSON schema "
                           "object", code="invalid_type")
        _compiles(f"{where}.function.parameters", parameters)
        entry = {"name": fname, "parameters": parameters}
        if isinstance(function.get("description"), str):
            entry["description"] = function["description"]
        tools.append({"type": "function", "function": entry})
    return tools


def _compiles(param: str, schema: dict | bool) -> None:
    try:
        json_schema_grammar(schema)
    except GrammarError as e:
        raise invalid(param, f"'{param}': {e}", code="invalid_schema") from None


# --------------------------------------------------------------------------------------------
# The chat template's abilities, found by rendering probes (as llama.cpp's minja does)

@dataclass(frozen=True)
class TemplateAbilities:
    tools: bool           # renders the `tools` variable
    tool_calls: bool      # renders an assistant message's tool_calls
    tool_responses: bool  # renders a "tool" message's content
    hermes: bool          # answers in <tool_call>{"name", "arguments"}</tool_call>


_PROBE = "dllama_probe_7f3a"


@lru_cache(maxsize=8)
def template_abilities(source: str) -> TemplateAbilities:
    from dllama.tokenizer.chat import ChatTemplateError, render_chat

    def renders(messages: list[dict], **extra) -> str:
        try:
            return render_chat(source, messages, True, bos_token="", eos_token="", **extra)
        except (ChatTemplateError, TypeError):
            return ""

    user = {"role": "user", "content": "hi"}
    tool = {"type": "function", "function": {"name": f"{_PROBE}_tool", "description": "probe",
                                             "parameters": EMPTY_PARAMETERS}}
    call = {"id": "call_1", "type": "function", "function": {"name": f"{_PROBE}_call", "arguments": "{}"}}
    tools = f"{_PROBE}_tool" in renders([user], tools=[tool])
    calls = f"{_PROBE}_call" in renders([user, {"role": "assistant", "content": None, "tool_calls": [call]}])
    responses = f"{_PROBE}_result" in renders([user, {"role": "assistant", "content": "", "tool_calls": [call]},
                                               {"role": "tool", "tool_call_id": "call_1",
                                                "content": f"{_PROBE}_result"}])
    return TemplateAbilities(tools, calls, responses, hermes=tools and calls and "<tool_call>" in source)


# --------------------------------------------------------------------------------------------
# The plan of one answer: the messages the template gets, the grammar, how to read the output

@dataclass
class AnswerPlan:
    messages: list[dict]
    template_vars: dict = field(default_factory=dict)
    grammar: str | None = None
    style: str = "text"               # "text", "generic" or "hermes": how parse() reads the output

    @property
    def calls_tools(self) -> bool:
        return self.style != "text"

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of the generated text."""
        if self.style == "generic":
            return _parse_generic(text)
        if self.style == "hermes":
            return _parse_hermes(text)
        return text, []


GENERIC_RESPONSE = '{"response": "'  # how a generic text answer starts (JSON_LAYOUT: no free whitespace)
_STRING_RUN = re.compile(r'(?:[^"\\]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')


class AnswerStream:
    """A streamed answer read for tool calls: the text of a generic {"response": "..."} answer is
    released as it is generated; anything else (a call, a Hermes answer) waits for the end."""

    def __init__(self, plan: AnswerPlan):
        self.plan = plan
        self.text = ""
        self.sent = ""  # content released so far

    def push(self, piece: str) -> str:
        """Content that can be sent now ("" while it must wait)."""
        self.text += piece
        if self.plan.style != "generic" or not self.text.startswith(GENERIC_RESPONSE):
            return ""
        run = _STRING_RUN.match(self.text, len(GENERIC_RESPONSE)).group()
        content = json.loads(f'"{run}"')
        if content and "\ud800" <= content[-1] <= "\udbff":  # half of a surrogate pair: wait for the other
            content = content[:-1]
        delta, self.sent = content[len(self.sent):], content
        return delta

    def finish(self) -> tuple[str | None, list[dict]]:
        """The rest of the content (what push() did not release) and the tool calls."""
        content, calls = self.plan.parse(self.text)
        if calls or content is None:
            return None, calls
        return (content[len(self.sent):] if content.startswith(self.sent) else ""), []


def plan_answer(template: str | None, messages: list[dict], tools: list[dict] | None = None,
                tool_choice: str | dict | None = None, response_format: dict | None = None) -> AnswerPlan:
    """How to prompt for, constrain and read one chat answer."""
    abilities = template_abilities(template) if template else TemplateAbilities(False, False, False, False)
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    offered = _offered_tools(tools or [], choice)
    if not offered:
        return AnswerPlan(_generic_history(messages, abilities), grammar=_format_grammar(response_format))
    if abilities.hermes:
        return AnswerPlan(messages, {"tools": tools}, _hermes_grammar(offered, choice), "hermes")
    required = choice != "auto"
    instruction = GENERIC_REQUIRED_INSTRUCTION if required else GENERIC_INSTRUCTION
    system = (f"{instruction}\n\nYou can call any of the following tools to satisfy the user's requests: "
              f"{json.dumps(offered, indent=2, ensure_ascii=False)}\n\nExample tool call syntax:\n\n"
              f'{{"tool_call": {{"name": "{offered[0]["function"]["name"]}", "arguments": {{...}}}}}}')
    history = _with_system(_generic_history(messages, abilities), system)
    return AnswerPlan(history, grammar=_generic_grammar(offered, required, response_format), style="generic")


def _offered_tools(tools: list[dict], choice: str | dict) -> list[dict]:
    if choice == "none":
        return []
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            raise invalid("tool_choice", f"'tool_choice' names the function {name!r}, which is not in 'tools'")
        return named
    if choice == "required" and not tools:
        raise invalid("tool_choice", "'tool_choice' is \"required\" but the request has no 'tools'")
    return tools


def _format_grammar(response_format: dict | None) -> str | None:
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        return json_schema_grammar({"type": "object"})
    return json_schema_grammar(response_format["json_schema"]["schema"])


def _call_schema(tool: dict) -> dict:
    function = tool["function"]
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters", EMPTY_PARAMETERS)},
            "required": ["name", "arguments"], "additionalProperties": False}


def _one_of(schemas: list[dict]) -> dict:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _generic_grammar(tools: list[dict], required: bool, response_format: dict | None) -> str:
    call = {"type": "object", "properties": {"tool_call": _one_of([_call_schema(t) for t in tools])},
            "required": ["tool_call"], "additionalProperties": False}
    if required:
        return json_schema_grammar(call)
    answer_schema = {"type": "string"}
    if response_format is not None:
        answer_schema = response_format.get("json_schema", {}).get("schema", {"type": "object"})
    response = {"type": "object", "properties": {"response": answer_schema}, "required": ["response"],
                "additionalProperties": False}
    return json_schema_grammar({"anyOf": [call, response]})


def _hermes_grammar(tools: list[dict], choice: str | dict) -> str:
    call = json.dumps({**_one_of([_call_schema(t) for t in tools]), "x-guidance": JSON_LAYOUT})
    if choice != "auto":
        return lark_grammar(f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {call}\n')
    # free text, in which each <tool_call> opens a block held to the tools' schemas (a lazy lexeme:
    # the text does not swallow the tag)
    return lark_grammar(f'''%llguidance {{}}
start: call_block* TEXT
call_block: call_start "\\n" call "\\n</tool_call>"
call_start[lazy]: TEXT "<tool_call>"
call: %json {call}
TEXT: /(.|\\n)*/
''')


def _with_system(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n\n{text}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _generic_history(messages: list[dict], abilities: TemplateAbilities) -> list[dict]:
    """Earlier tool calls and tool results written as JSON where the template cannot render them."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls") and not abilities.tool_calls:
            calls = [{"name": c["function"]["name"], "arguments": _loads(c["function"]["arguments"]), "id": c["id"]}
                     for c in message.pop("tool_calls")]
            body = {"tool_calls": calls} if len(calls) > 1 else {"tool_call": calls[0]}
            if message.get("content"):
                body["content"] = message["content"]
            message["content"] = json.dumps(body, ensure_ascii=False)
        if message["role"] == "tool" and not abilities.tool_responses:
            result = {"tool_call_id": message.pop("tool_call_id", None),
                      "content": _loads(message.get("content") or "")}
            message = {"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)}
        if message.get("content") is None:
            message["content"] = ""
        out.append(message)
    return out


def _loads(arguments: Any) -> Any:
    """A JSON text's value (arguments and tool results are usually JSON), else the value itself."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _call(name: str, arguments: Any) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _parse_generic(text: str) -> tuple[str | None, list[dict]]:
    try:
        answer = json.loads(text)
    except ValueError:
        return _cut_response(text), []
    if isinstance(answer, dict) and isinstance(answer.get("tool_call"), dict):
        call = answer["tool_call"]
        return None, [_call(call.get("name", ""), call.get("arguments", {}))]
    if isinstance(answer, dict) and "response" in answer:
        response = answer["response"]
        return (response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)), []
    return text, []


def _cut_response(text: str) -> str:
    """An answer max_tokens cut short: the text of a started {"response": "..."}, else what was generated."""
    if text.startswith('{"response": "'):
        for cut in range(6):  # drop a dangling backslash or a partial \uXXXX escape, then close the string
            try:
                return json.loads(text[:len(text) - cut] + '"}')["response"]
            except ValueError:
                continue
    return text


HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _parse_hermes(text: str) -> tuple[str | None, list[dict]]:
    calls = []
    for body in HERMES_CALL.findall(text):
        try:
            call = json.loads(body)
        except ValueError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            calls.append(_call(call["name"], call.get("arguments", {})))
    if not calls:
        return text, []
    content = HERMES_CALL.sub("", text).strip()
    return content or None, calls
