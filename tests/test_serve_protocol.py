"""The serve layer's pure parts: stop sequences across token boundaries, prefix matching, request validation."""
from __future__ import annotations

import json

import pytest

from dllama.runtime.sampler import Sampling
from dllama.runtime.serve import openai_api
from dllama.runtime.serve.openai_api import ApiError
from dllama.runtime.serve.runner import StopScanner


def scan(pieces, stops):
    scanner = StopScanner(stops)
    out = ""
    for piece in pieces:  # as the generation loop does: nothing is pushed after a stop
        out += scanner.push(piece)
        if scanner.stopped:
            break
    if not scanner.stopped:
        out += scanner.flush()
    return out, scanner.stopped


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hello", " wor", "ld"], ["world"], ("Hello ", True)),            # stop split across pieces
    (["a", "b", "c", "d"], ["bc"], ("a", True)),
    (["ab", "X", "cd"], ["abc"], ("abXcd", False)),                   # a prefix that did not complete
    (["xx", "ENDyy"], ["END", "xxE"], ("", True)),                    # the earliest match wins
    (["one\n\ntwo"], ["\n\n"], ("one", True)),
    (["no stop here"], [], ("no stop here", False)),
    (["tail E", "N"], ["END"], ("tail EN", False)),                   # held-back text is flushed at the end
])
def test_stop_scanner_cuts_at_first_stop_sequence(pieces, stops, expected):
    assert scan(pieces, stops) == expected


def test_stop_scanner_never_emits_part_of_a_stop_sequence():
    scanner = StopScanner(["<|end|>"])
    emitted = [scanner.push(c) for c in "ok<|en"]
    assert "".join(emitted) == "ok"
    assert scanner.push("d|>more") == ""
    assert scanner.stopped


def error_of(parse, body) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as info:
        parse(raw)
    assert info.value.status == 400
    return info.value


CHAT_OK = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    ({**CHAT_OK, "temperature": "hot"}, "temperature", "invalid_type"),
    ({**CHAT_OK, "max_tokens": True}, "max_tokens", "invalid_type"),
    ({**CHAT_OK, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({**CHAT_OK, "temperature": 3}, "temperature", "invalid_value"),
    ({**CHAT_OK, "top_p": 0}, "top_p", "invalid_value"),
    ({**CHAT_OK, "stop": ["a", 1]}, "stop", "invalid_type"),
    ({**CHAT_OK, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({**CHAT_OK, "n": 2}, "n", "unsupported_value"),
    ({**CHAT_OK, "presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    ({**CHAT_OK, "temperature": float("nan")}, "temperature", "invalid_value"),
    ({**CHAT_OK, "top_p": float("inf")}, "top_p", "invalid_value"),
    ({**CHAT_OK, "seed": -1}, "seed", "invalid_value"),
    ({**CHAT_OK, "seed": 2 ** 64}, "seed", "invalid_value"),
    ({**CHAT_OK, "top_k": -1}, "top_k", "invalid_value"),
    ({**CHAT_OK, "min_p": 1.5}, "min_p", "invalid_value"),
    ({**CHAT_OK, "repeat_penalty": 0}, "repeat_penalty", "invalid_value"),
    ({**CHAT_OK, "top_logprobs": 3}, "top_logprobs", "invalid_value"),            # without logprobs: true
    ({**CHAT_OK, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({**CHAT_OK, "logit_bias": {"five": 10}}, "logit_bias", "invalid_value"),
    ({**CHAT_OK, "logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
    ({**CHAT_OK, "reasoning_effort": 3}, "reasoning_effort", "invalid_type"),
    ({**CHAT_OK, "response_format": {"type": "yaml"}}, "response_format.type", "invalid_value"),
    ({**CHAT_OK, "response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_field"),
    ({**CHAT_OK, "tools": [{"type": "function"}]}, "tools[0].function", "missing_field"),
    ({**CHAT_OK, "tool_choice": "always"}, "tool_choice", "invalid_value"),
    ({**CHAT_OK, "stream": "yes"}, "stream", "invalid_type"),
    ({"messages": []}, "messages", "empty_messages"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_field"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1", "function": {"name": "f",
                                                                                  "arguments": "{}"}}]}]},
     "messages[0].tool_calls", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "unsupported_value"),
    ({}, "messages", "missing_field"),
])
def test_bad_chat_requests_name_the_parameter(body, param, code):
    error = error_of(openai_api.parse_chat_request, body)
    assert (error.param, error.code) == (param, code)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
])
def test_bad_completion_requests_name_the_parameter(body, param):
    assert error_of(openai_api.parse_completion_request, body).param == param


def test_valid_requests_get_defaults():
    chat = openai_api.parse_chat_request(json.dumps({**CHAT_OK, "stop": "###", "seed": 3,
                                                     "max_completion_tokens": 9}).encode())
    assert chat.stop == ["###"] and chat.sampling.seed == 3 and chat.max_tokens == 9 and chat.max_tokens is not None
    assert chat.sampling.temperature == 1.0 and chat.stream is False
    completion = openai_api.parse_completion_request(b'{"prompt": ["once upon"], "temperature": 0}')
    assert completion.prompt == "once upon" and completion.max_tokens == openai_api.COMPLETIONS_DEFAULT_MAX_TOKENS
    assert completion.sampling.temperature == 0.0
    neutral = openai_api.parse_chat_request(json.dumps({**CHAT_OK, "presence_penalty": 0, "frequency_penalty": 0.0,
                                                      "logit_bias": {}, "logprobs": False, "n": 1}).encode())
    assert neutral.messages == CHAT_OK["messages"] and neutral.logprobs is False
    parts = openai_api.parse_chat_request(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, '
                                          b'{"type": "text", "text": "b"}]}]}')
    assert parts.messages == [{"role": "user", "content": "ab"}]


def test_unknown_fields_are_ignored_and_reported():
    chat = openai_api.parse_chat_request(json.dumps({**CHAT_OK, "frobnicate": 1, "cache_prompt": True,
                                                     "messages": [{"role": "user", "content": "hi", "extra": 1}]
                                                     }).encode())
    assert chat.ignored_fields == ("frobnicate", "cache_prompt")
    assert chat.messages == CHAT_OK["messages"]
    completion = openai_api.parse_completion_request(b'{"prompt": "x", "messages": []}')
    assert completion.prompt == "x" and completion.ignored_fields == ("messages",)


def test_sampling_and_logprob_fields_reach_the_sampling():
    chat = openai_api.parse_chat_request(json.dumps({
        **CHAT_OK, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.2,
        "repeat_last_n": 32, "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"7": -100, "9": 2},
        "seed": 2 ** 63, "logprobs": True, "top_logprobs": 3, "reasoning_effort": "low", "n": 1}).encode())
    assert chat.sampling == Sampling(temperature=0.7, top_p=0.9, seed=2 ** 63, top_k=40, min_p=0.05,
                                     repeat_penalty=1.2, repeat_last_n=32, presence_penalty=0.5,
                                     frequency_penalty=-0.5, logit_bias={7: -100.0, 9: 2.0}, top_logprobs=3)
    assert chat.logprobs is True
    completion = openai_api.parse_completion_request(b'{"prompt": "x", "logprobs": 2}')
    assert completion.logprobs is True and completion.sampling.top_logprobs == 2
    assert openai_api.parse_completion_request(b'{"prompt": "x"}').sampling.top_logprobs is None


def test_structured_output_and_tool_fields_are_typed_and_passed_through():
    tool = {"type": "function", "function": {"name": "get_weather", "description": "the weather",
                                             "parameters": {"type": "object", "properties": {"city": {
                                                 "type": "string"}}}}}
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    req = openai_api.parse_chat_request(json.dumps({
        "messages": history, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                   "strict": True}}}).encode())
    assert req.tools == [tool]
    assert req.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert req.parallel_tool_calls is False
    assert req.response_format == {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"},
                                                                          "strict": True}}
    assert req.messages[1] == {"role": "assistant", "content": None, "tool_calls": history[1]["tool_calls"]}
    assert req.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
