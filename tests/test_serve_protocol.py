"""The serve layer's pure parts: stop sequences across token boundaries, prefix matching, request validation."""
from __future__ import annotations

import json

import pytest

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
    ({**CHAT_OK, "frobnicate": 1}, "frobnicate", "unknown_field"),
    ({**CHAT_OK, "temperature": "hot"}, "temperature", "invalid_type"),
    ({**CHAT_OK, "max_tokens": True}, "max_tokens", "invalid_type"),
    ({**CHAT_OK, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({**CHAT_OK, "temperature": 3}, "temperature", "invalid_value"),
    ({**CHAT_OK, "top_p": 0}, "top_p", "invalid_value"),
    ({**CHAT_OK, "stop": ["a", 1]}, "stop", "invalid_type"),
    ({**CHAT_OK, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({**CHAT_OK, "n": 2}, "n", "unsupported_value"),
    ({**CHAT_OK, "presence_penalty": 0.5}, "presence_penalty", "unsupported_value"),
    ({**CHAT_OK, "logprobs": True}, "logprobs", "unsupported_value"),
    ({**CHAT_OK, "logit_bias": {"5": 10}}, "logit_bias", "unsupported_value"),
    ({"messages": []}, "messages", "empty_messages"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_field"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls", "unknown_field"),
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
    ({"prompt": "x", "messages": []}, "messages"),
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
    assert neutral.messages == CHAT_OK["messages"]
    parts = openai_api.parse_chat_request(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, '
                                          b'{"type": "text", "text": "b"}]}]}')
    assert parts.messages == [{"role": "user", "content": "ab"}]
