"""`dllama-run serve` as a real process on loopback, driven by the official openai client, over
the tiny-llama conformance model (f32). Expected texts come from running the same engine locally."""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import numpy as np
import openai
import pytest
from conftest import CONFORMANCE, require_fixtures
from serve_helpers import ServerProcess, common_prefix, load_engine_and_tokenizer, local_generation

from dllama.runtime.sampler import Sampling
from dllama.tokenizer.from_hf import convert_tokenizer

MODEL_DIR = CONFORMANCE / "tiny-llama"
MODEL = MODEL_DIR / "expected_f32.m"
CONTEXT = 256  # the model's max_position_embeddings
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    require_fixtures(MODEL_DIR)
    path = tmp_path_factory.mktemp("serve") / "tiny-llama.t"
    path.write_bytes(convert_tokenizer(MODEL_DIR).to_bytes())  # with the embedded HF tokenizer
    return path


@pytest.fixture(scope="module")
def local(tokenizer_path):
    """The same engine and tokenizer in this process, to compute what the server must answer."""
    return load_engine_and_tokenizer(MODEL, tokenizer_path, CONTEXT)


@pytest.fixture(scope="module")
def server(tokenizer_path, local):
    proc = ServerProcess("--model", str(MODEL), "--tokenizer", str(tokenizer_path), "--max-seq-len", str(CONTEXT))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat_ids(tok, messages) -> list[int]:
    return tok.encode(tok.render_chat(messages, add_generation_prompt=True), add_bos=False)


def expected(local, prompt_ids, max_tokens, sampling) -> tuple[str, list[int], str]:
    """(text, tokens, finish_reason) of a fresh local run: generate() stops at eos without yielding it."""
    engine, tok = local
    tokens = local_generation(engine, tok, prompt_ids, max_tokens, sampling)
    return tok.decode(tokens), tokens, "length" if len(tokens) == max_tokens else "stop"


def test_models_and_health_describe_the_served_model(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["expected_f32"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["busy"] is False


def test_greedy_chat_matches_local_generation(client, local):
    text, tokens, finish = expected(local, chat_ids(local[1], HELLO), 12, Sampling(temperature=0.0))
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason == finish
    assert reply.usage.prompt_tokens == len(chat_ids(local[1], HELLO))
    assert reply.usage.completion_tokens == len(tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(tokens)


def test_streamed_chat_equals_non_streamed_for_the_same_seed(client, local):
    args = dict(model="tiny", messages=HELLO, max_tokens=40, temperature=1.0, top_p=0.95, seed=1234)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert streamed == whole.choices[0].message.content
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text, _, _ = expected(local, chat_ids(local[1], HELLO), 40, Sampling(1.0, 0.95, 1234))
    assert streamed == text


def test_greedy_completion_matches_local_generation(client, local):
    prompt = "Once upon a time"
    ids = local[1].encode(prompt)
    text, tokens, finish = expected(local, ids, 10, Sampling(temperature=0.0))
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == finish
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(tokens)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert streamed == text


def test_max_tokens_ends_with_length(client, local):
    ids = local[1].encode("The weather today")
    text, tokens, finish = expected(local, ids, 5, Sampling(temperature=0.0))
    assert finish == "length"  # this prompt's greedy continuation runs well past 5 tokens without an eos
    reply = client.completions.create(model="tiny", prompt="The weather today", max_tokens=5, temperature=0)
    assert (reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("length", 5)
    assert reply.choices[0].text == text


def test_stop_sequence_spanning_tokens_is_cut_and_not_emitted(client, local):
    engine, tok = local
    ids = tok.encode("Once upon a time")
    text, tokens, _ = expected(local, ids, 30, Sampling(temperature=0.0))
    pieces = [tok.decode(tokens[:i]) for i in range(len(tokens) + 1)]
    # a stop string that starts inside one token and ends inside a later one
    boundary = next(len(p) for p in pieces if len(p) >= 6)
    stop = text[boundary - 2: boundary + 3]
    cut = text.index(stop)
    for stream in (False, True):
        reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0,
                                          stop=[stop, "never-appears"], stream=stream)
        if stream:
            chunks = list(reply)
            got = "".join(c.choices[0].text for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            got, finish = reply.choices[0].text, [reply.choices[0].finish_reason]
        assert got == text[:cut]
        assert finish == ["stop"]


def test_eos_ends_generation_with_stop_and_is_not_shown(client, local):
    engine, tok = local
    ids = tok.encode("Tell me a story")
    # find a seed whose sampled continuation reaches an eos token (computed locally)
    for seed in range(200):
        text, tokens, finish = expected(local, ids, 60, Sampling(1.5, 1.0, seed))
        if finish == "stop":
            break
    else:
        pytest.fail("no seed in 0..199 reaches eos within 60 tokens")
    reply = client.completions.create(model="tiny", prompt="Tell me a story", max_tokens=60, temperature=1.5, seed=seed)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == text
    assert reply.usage.completion_tokens == len(tokens) < 60


def test_follow_up_prompt_reuses_the_kv_cache_and_says_so(client, local):
    engine, tok = local
    first = "Once upon a time there was a"
    text, tokens, finish = expected(local, tok.encode(first), 8, Sampling(temperature=0.0))
    assert finish == "length"
    reply = client.completions.create(model="tiny", prompt=first, max_tokens=8, temperature=0)
    assert reply.choices[0].text == text
    follow_up = first + text + " and then"
    ids = tok.encode(follow_up)
    evaluated = tok.encode(first) + tokens[:-1]   # the last sampled token was never run through the model
    shared = common_prefix(evaluated, ids)
    again = client.completions.create(model="tiny", prompt=follow_up, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == shared >= len(tok.encode(first))
    fresh_text, _, _ = expected(local, ids, 4, Sampling(temperature=0.0))
    assert again.choices[0].text == fresh_text


def reference_logprobs(local, prompt_ids, tokens) -> np.ndarray:
    """log_softmax of the engine's logits at each generated position (one batched pass)."""
    engine, _ = local
    engine.reset()
    logits = engine.forward(prompt_ids + tokens[:-1], 0)[len(prompt_ids) - 1:].astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def test_chat_logprobs_are_the_log_softmax_of_the_engines_logits(client, local):
    ids = chat_ids(local[1], HELLO)
    _, tokens, _ = expected(local, ids, 6, Sampling(temperature=0.0))
    args = dict(model="tiny", messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = client.chat.completions.create(**args).choices[0].logprobs.content
    reference = reference_logprobs(local, ids, tokens)
    assert [c.token for c in content] == [local[1].decode([t]) for t in tokens]
    for c, row, token in zip(content, reference, tokens):
        assert c.logprob == pytest.approx(row[token], abs=1e-4)   # batched vs one token at a time: last bits
        assert [t.logprob for t in c.top_logprobs] == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)
    streamed = [c for chunk in client.chat.completions.create(**args, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_completion_logprobs_and_top_k_1_equals_greedy(client, local):
    prompt = "Once upon a time"
    ids = local[1].encode(prompt)
    text, tokens, _ = expected(local, ids, 5, Sampling(temperature=0.0))
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens == [local[1].decode([t]) for t in tokens]
    assert logprobs.token_logprobs == pytest.approx(
        [row[t] for row, t in zip(reference_logprobs(local, ids, tokens), tokens)], abs=1e-4)
    assert all(len(top) == 2 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0
    sampled = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.5, seed=9,
                                        extra_body={"top_k": 1, "min_p": 0.01, "repeat_penalty": 1.0})
    assert sampled.choices[0].text == text


BAD_REQUESTS = [
    (b'{"messages": [{"role": "user", "content": "hi"}', "invalid_json", None),
    (json.dumps({"messages": HELLO, "temperature": float("nan")}).encode(), "invalid_value", "temperature"),
    (json.dumps({"messages": HELLO, "max_tokens": "ten"}).encode(), "invalid_type", "max_tokens"),
    (json.dumps({"messages": HELLO, "stop": 3}).encode(), "invalid_type", "stop"),
    (json.dumps({"messages": []}).encode(), "empty_messages", "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(), "context_length_exceeded",
     "messages"),
]


@pytest.mark.parametrize("body, code, param", BAD_REQUESTS, ids=[c for _, c, _ in BAD_REQUESTS])
def test_bad_requests_get_400_with_openai_error_and_server_keeps_serving(server, client, body, code, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert client.completions.create(model="tiny", prompt="still there?", max_tokens=2).choices[0].finish_reason


def test_unknown_route_and_wrong_method_get_openai_errors(server):
    missing = httpx.get(f"{server.url}/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(f"{server.url}/v1/chat/completions")
    assert wrong.status_code == 405 and "GET is not allowed" in wrong.json()["error"]["message"]


def test_openai_client_raises_bad_request_for_a_long_prompt(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="many words " * 300, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_load_200_requests_from_8_clients_only_429s_and_no_leak(tokenizer_path, local):
    server = ServerProcess("--model", str(MODEL), "--tokenizer", str(tokenizer_path), "--max-seq-len", str(CONTEXT),
                           "--max-queue", "4", "--parallel", "2")  # 2 generating + 4 waiting < 8 clients
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)

        def once(i: int) -> None:
            messages = [{"role": "user", "content": f"request {i}"}]
            if i % 3 == 0:
                text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model="tiny", messages=messages, max_tokens=16, seed=i, stream=True))
                assert isinstance(text, str)
            elif i % 3 == 1:
                assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                      seed=i).choices[0].finish_reason in ("stop", "length")
            else:
                assert client.completions.create(model="tiny", prompt=f"number {i}",
                                                 max_tokens=16).choices[0].finish_reason in ("stop", "length")

        def one(i: int) -> int:
            """Completes request i, retrying after each 429 like a polite client; returns the 429 count."""
            refused = 0
            while True:
                try:
                    once(i)
                    return refused
                except openai.RateLimitError as e:
                    assert e.status_code == 429 and e.body["code"] == "queue_full"
                    refused += 1
                    time.sleep(0.05)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(40)))  # warm up: kernels, caches, allocator
        before = server.rss_bytes()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            refused = list(pool.map(one, range(200)))  # any error other than 429 propagates here
        after = server.rss_bytes()
        assert sum(refused) > 0, "8 clients against a queue of 4 should meet some 429s"
        assert abs(after - before) <= 0.10 * before, f"RSS {before} -> {after}"
        assert httpx.get(f"{server.url}/health").json() | {"busy": False} == {
            "status": "ok", "model": "expected_f32", "busy": False, "queued": 0, "max_queue": 4, "parallel": 2,
            "generating": 0}
    finally:
        server.stop()
