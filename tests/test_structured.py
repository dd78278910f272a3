"""Structured output and tool calling on SmolLM2: the grammar engine's token mask,
response_format json_schema answers that validate, and the openai client's tool calls and
tool-calling loop against a server on loopback."""
from __future__ import annotations

import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from conftest import CONFORMANCE, require_fixtures
from serve_helpers import RecordingEngine, in_process_server, load_engine_and_tokenizer

from dllama.runtime.conversation import Conversation
from dllama.runtime.generate import generate
from dllama.runtime.sampler import Sampler
from dllama.runtime.serve import create_app
from dllama.runtime.serve.tools import AnswerPlan, AnswerStream, plan_answer, template_abilities
from dllama.runtime.structured import GrammarError, GrammarVocabulary, json_schema_grammar
from dllama.tokenizer import Tokenizer
from dllama.tokenizer.from_hf import convert_tokenizer

CONTEXT = 1024
TINY_QWEN3 = CONFORMANCE / "tiny-qwen3"

# bounded strings and small numbers: every answer closes well within MAX_TOKENS
REVIEW = {"type": "object", "additionalProperties": False, "required": ["topic", "sentiment", "stars"],
          "properties": {"topic": {"type": "string", "minLength": 1, "maxLength": 16},
                         "sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "stars": {"type": "integer", "minimum": 1, "maximum": 5}}}
MAX_TOKENS = 48
REVIEWS = ["The pizza was cold and late.", "Best concert of my life!", "The hotel room was fine, nothing special.",
           "My new phone's battery dies by noon.", "The museum tour guide was wonderful.",
           "This keyboard feels cheap.", "Delivery arrived a day early, great.", "The movie was too long.",
           "Our hiking trip had stunning views.", "The bank kept me on hold for an hour.",
           "Lovely little bakery with fresh bread.", "The update broke my printer.",
           "Average coffee, friendly staff.", "The train was clean and on time.", "The dentist was rude.",
           "Kids loved the zoo.", "The laptop runs hot but fast.", "Terrible customer support chat.",
           "The garden center had a great selection.", "My flight was cancelled twice."]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 24},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "maxLength": 24}}}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def smollm2(smollm2_files):
    return load_engine_and_tokenizer(smollm2_files["q40"], smollm2_files["tokenizer"], CONTEXT)


@pytest.fixture(scope="module")
def direct(smollm2_files):
    """An engine of its own for the tests that generate without the server (whose cache it would spoil)."""
    return load_engine_and_tokenizer(smollm2_files["q40"], smollm2_files["tokenizer"], CONTEXT)


@pytest.fixture(scope="module")
def vocab(smollm2):
    return GrammarVocabulary.of(smollm2[1])


@pytest.fixture(scope="module")
def recording(smollm2):
    return RecordingEngine(smollm2[0])


@pytest.fixture(scope="module")
def client(smollm2, recording):
    app = create_app(recording, smollm2[1], model_id="smollm2", context_length=CONTEXT)
    with in_process_server(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def allowed_tokens(constraint, n) -> set[int]:
    return set(np.nonzero(constraint.allowed(n))[0].tolist())


# --------------------------------------------------------------------------------------------
# The mask

def test_mask_follows_the_schema_and_allows_eos_only_where_the_json_is_complete(smollm2, vocab):
    tok = smollm2[1]
    constraint = vocab.constraint(json_schema_grammar(REVIEW))
    text = '{"topic": "pizza", "sentiment": "negative", "stars": 2}'
    eos = set(tok.eos_ids)
    for token in tok.encode(text, add_bos=False):
        allowed = allowed_tokens(constraint, tok.vocab_size)
        assert token in allowed and not allowed & eos
        constraint.advance(token)
    assert constraint.done and allowed_tokens(constraint, tok.vocab_size) == eos
    # what the schema forbids is masked: an array, a fourth key, a sentiment not in the enum
    for wrong in ("[", '{"color', '{"topic": "x", "sentiment": "angry'):
        assert not _can_write(vocab.constraint(json_schema_grammar(REVIEW)), tok.encode(wrong, add_bos=False), tok)


def _can_write(constraint, ids, tok) -> bool:
    for token in ids:
        if token not in allowed_tokens(constraint, tok.vocab_size):
            return False
        constraint.advance(token)
    return True


def test_mask_covers_model_rows_beyond_the_tokenizer_as_disallowed(smollm2, vocab):
    mask = vocab.constraint(json_schema_grammar({"type": "object"})).allowed(smollm2[1].vocab_size + 7)
    assert mask.shape == (smollm2[1].vocab_size + 7,) and not mask[-7:].any() and mask.any()


def test_sampler_never_picks_a_masked_token_greedy_or_sampled():
    logits = np.arange(10, dtype=np.float32)  # greedy alone would pick 9
    allowed = np.zeros(10, dtype=bool)
    allowed[[2, 5]] = True
    assert Sampler(temperature=0.0)(logits, allowed) == 5
    sampler = Sampler(temperature=2.0, top_p=0.9, seed=3)
    picks = {sampler(logits, allowed) for _ in range(200)}
    assert picks == {2, 5}


def test_generation_ends_where_the_grammar_ends_without_another_forward(direct, vocab):
    engine, tok = direct
    recording = RecordingEngine(engine)
    engine.reset()
    ids = tok.encode_chat([{"role": "user", "content": "Review: the soup was great."}])
    out = list(generate(recording, ids, MAX_TOKENS, eos_ids=tok.eos_ids, conversation=Conversation(CONTEXT),
                        constraint=vocab.constraint(json_schema_grammar(REVIEW))))
    jsonschema.validate(json.loads(tok.decode(out)), REVIEW)
    # the prompt, then one forward per generated token but the last (the grammar was complete)
    assert sum(len(call) for _, call in recording.calls) == len(ids) + len(out) - 1


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, {"type": 5}, {"type": "string", "pattern": "("},
    {"type": "integer", "minimum": 10, "maximum": 1}, {"enum": []}, False, {"type": "string", "format": "nonsense"},
    {"type": "array", "items": json.loads('{"type": "array", "items": ' * 300 + "{}" + "}" * 300)},
])
def test_a_schema_the_engine_cannot_compile_is_a_grammar_error(schema):
    with pytest.raises(GrammarError):
        json_schema_grammar(schema)


# --------------------------------------------------------------------------------------------
# response_format through the openai client

def test_json_schema_answers_validate_for_20_prompts(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": True}}
    answers = []
    for review in REVIEWS:
        reply = client.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=MAX_TOKENS, response_format=fmt,
            messages=[{"role": "system", "content": "Classify the review as JSON."},
                      {"role": "user", "content": review}])
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        answer = json.loads(reply.choices[0].message.content)
        jsonschema.validate(answer, REVIEW)
        answers.append(answer)
    assert len({a["topic"] for a in answers}) > 5  # the model answered each prompt, not one fixed text


def test_json_object_answer_is_an_object_and_streams_the_same(client):
    kw = dict(model="smollm2", temperature=0, max_tokens=64, response_format={"type": "json_object"},
              messages=[{"role": "user", "content": "Give a JSON object with keys a and b set to 1 and 2."}])
    reply = client.chat.completions.create(**kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(streamed), dict)
    else:  # cut by max_tokens: still the start of an object
        assert reply.choices[0].finish_reason == "length" and streamed.startswith("{")


# --------------------------------------------------------------------------------------------
# tools through the openai client

def _only_call(reply):
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return call


def test_tool_choice_required_and_named_give_calls_whose_arguments_match_the_schema(client):
    ask = [{"role": "user", "content": "What's the weather like in Oslo right now?"}]
    call = _only_call(client.chat.completions.create(model="smollm2", messages=ask, tools=TOOLS,
                                                     tool_choice="required", max_tokens=64, temperature=0))
    assert call.id.startswith("call_") and call.type == "function"
    named = _only_call(client.chat.completions.create(
        model="smollm2", messages=ask, tools=TOOLS, max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert named.function.name == "get_time"


def test_streamed_tool_call_arrives_as_delta_chunks_that_add_up_to_the_call(client):
    ask = [{"role": "user", "content": "Weather in Lima, in fahrenheit please."}]
    kw = dict(model="smollm2", messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=64, temperature=0)
    plain = _only_call(client.chat.completions.create(**kw))
    name, arguments, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.index == 0
            name += delta.function.name or ""
            arguments += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments, finish) == (plain.function.name, plain.function.arguments, "tool_calls")


def test_streamed_auto_answer_equals_the_plain_one_and_its_text_arrives_in_pieces(client):
    kw = dict(model="smollm2", tools=[WEATHER], tool_choice="auto", max_tokens=48, temperature=0,
              messages=[{"role": "user", "content": "Say hello to my friend Ann in one sentence."}])
    plain = client.chat.completions.create(**kw).choices[0]
    deltas, calls = [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        deltas += [delta.content] if delta.content else []
        calls += delta.tool_calls or []
    if plain.message.tool_calls:
        assert [(c.function.name, c.function.arguments) for c in calls] == \
            [(c.function.name, c.function.arguments) for c in plain.message.tool_calls]
    else:
        assert "".join(deltas) == plain.message.content and not calls
        assert len(deltas) > 1 or plain.finish_reason == "stop" and len(plain.message.content) < 8


def test_answer_stream_releases_a_generic_text_answer_as_it_comes_and_holds_calls():
    plan = AnswerPlan([], style="generic")
    text = '{"response": "Hi \\"you\\" \\ud83d\\ude00 ok\\n end"}'
    stream = AnswerStream(plan)
    released = [stream.push(c) for c in text]
    rest, calls = stream.finish()
    assert "".join(released) + rest == 'Hi "you" \U0001F600 ok\n end' == plan.parse(text)[0] and calls == []
    assert sum(1 for r in released if r) > 5  # piece by piece, never half an escape or a surrogate
    stream = AnswerStream(plan)
    call = '{"tool_call": {"name": "get_time", "arguments": {"zone": "UTC"}}}'
    assert not any(stream.push(c) for c in call)
    content, calls = stream.finish()
    assert content is None and calls[0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}


def test_openai_tool_calling_loop_sends_the_result_back_and_gets_an_answer(client, smollm2, recording):
    messages = [{"role": "user", "content": "Is it warm in Rome today?"}]
    reply = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER],
                                           tool_choice="required", max_tokens=64, temperature=0)
    call = _only_call(reply)
    messages.append(reply.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 27, "sky": "sunny"})})
    final = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=40, temperature=0)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content.strip()
    # the model saw its call and the tool's result: both are in the prompt it was given
    prompt = smollm2[1].decode(recording.cache_contents()[:final.usage.prompt_tokens])
    assert '"get_weather"' in prompt and '"celsius": 27' in prompt and call.id in prompt


@pytest.mark.parametrize("extra, param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/x"}}}},
     "response_format.json_schema.schema"),
])
def test_bad_tools_or_response_format_get_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       **extra)
    assert e.value.body["param"] == param


HOSTILE = [
    {"tools": "get_weather"}, {"tools": [5]}, {"tools": [{"type": "retrieval"}]}, {"tools": [WEATHER, WEATHER]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
    {"tool_choice": 7}, {"tool_choice": "sometimes"}, {"tool_choice": {"type": "function", "function": {}}},
    {"response_format": "json"}, {"response_format": {"type": "json_schema"}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": False}}},
    {"messages": [{"role": "assistant", "content": None}]},
    {"messages": [{"role": "assistant", "tool_calls": "call"}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
    {"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]},
]


@pytest.mark.parametrize("extra", HOSTILE)
def test_malformed_tools_messages_and_formats_get_openai_400s(client, extra):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    reply = httpx.post(f"{client.base_url}chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"} and reply.json()["error"]["param"]


# --------------------------------------------------------------------------------------------
# how tools reach the prompt

HERMES = ("{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
          "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
          "{% for c in m.tool_calls %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}"
          "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_smollm2_template_ignores_tools_so_they_go_into_the_system_prompt(smollm2):
    tok = smollm2[1]
    assert template_abilities(tok.chat_template).tools is False
    plan = plan_answer(tok.chat_template, [{"role": "user", "content": "hi"}], TOOLS, "auto")
    assert plan.style == "generic" and plan.messages[0]["role"] == "system"
    assert '"get_time"' in tok.render_chat(plan.messages, **plan.template_vars)


def test_a_hermes_template_gets_the_tools_and_its_tool_call_blocks_are_read():
    assert template_abilities(HERMES).hermes
    plan = plan_answer(HERMES, [{"role": "user", "content": "hi"}], TOOLS, "auto")
    assert plan.style == "hermes" and plan.template_vars == {"tools": TOOLS}
    content, calls = plan.parse('Let me check.<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n'
                                '</tool_call>')
    assert content == "Let me check." and calls[0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}



HERMES_CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
WRONG_CALLS = ('<tool_call>\n{"name": "get_date"', 'Hm. <tool_call>\n{"name": "get_time", "arguments": {"x')


@pytest.fixture(scope="module")
def qwen_tokenizer():
    require_fixtures(TINY_QWEN3)
    return Tokenizer.from_file(convert_tokenizer(TINY_QWEN3))  # a real Qwen vocabulary (tiny)


def _writes(tok, grammar, text) -> bool:
    return _can_write(GrammarVocabulary.of(tok).constraint(grammar), tok.encode(text, add_bos=False), tok)


def test_a_hermes_template_with_a_required_call_is_constrained_to_one_tool_call_block(qwen_tokenizer):
    tok = qwen_tokenizer
    plan = plan_answer(HERMES, [{"role": "user", "content": "hi"}], TOOLS, "required")
    constraint = GrammarVocabulary.of(tok).constraint(plan.grammar)
    assert _can_write(constraint, tok.encode(HERMES_CALL, add_bos=False), tok) and constraint.done
    assert not any(_writes(tok, plan.grammar, wrong) for wrong in ("Sure", *WRONG_CALLS))


def test_a_hermes_template_with_auto_allows_text_and_holds_each_call_block_to_the_schemas(qwen_tokenizer):
    tok = qwen_tokenizer
    plan = plan_answer(HERMES, [{"role": "user", "content": "hi"}], TOOLS, "auto")
    assert _writes(tok, plan.grammar, "Sure, it is sunny in Oslo.")
    assert _writes(tok, plan.grammar, "Let me look." + HERMES_CALL)
    assert not any(_writes(tok, plan.grammar, wrong) for wrong in WRONG_CALLS)


@pytest.mark.parametrize("text, content", [
    ('{"response": "Hello there"}', "Hello there"),
    ('{"response": "Cut here', "Cut here"),
    ('{"response": "Cut \\u00e', "Cut "),
    ('{"resp', '{"resp'),
])
def test_a_generic_text_answer_becomes_the_content_even_when_max_tokens_cut_it(smollm2, text, content):
    plan = plan_answer(smollm2[1].chat_template, [{"role": "user", "content": "hi"}], TOOLS, "auto")
    assert plan.parse(text) == (content, [])

