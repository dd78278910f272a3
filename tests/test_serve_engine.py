"""The server's hold on the engine, seen through a recording wrapper around the real tiny-llama
engine: KV cache reuse across turns, cancellation on disconnect, the bounded queue, API keys,
and a failing engine. The app runs on uvicorn in a thread with real loopback sockets."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from conftest import CONFORMANCE, require_fixtures
from serve_helpers import (
    GatedEngine,
    RecordingEngine,
    common_prefix,
    drain_until_idle,
    in_process_server,
    load_engine_and_tokenizer,
)

from dllama.runtime.serve import create_app
from dllama.tokenizer.from_hf import convert_tokenizer

MODEL_DIR = CONFORMANCE / "tiny-llama"
CONTEXT = 256


@pytest.fixture(scope="module")
def engine_and_tokenizer(tmp_path_factory):
    require_fixtures(MODEL_DIR)
    path = tmp_path_factory.mktemp("serve") / "tiny-llama.t"
    path.write_bytes(convert_tokenizer(MODEL_DIR).to_bytes())  # with the embedded HF tokenizer
    return load_engine_and_tokenizer(MODEL_DIR / "expected_f32.m", path, CONTEXT)


def serve(engine_and_tokenizer, **options):
    engine, tok = engine_and_tokenizer
    recording = RecordingEngine(engine)
    app = create_app(recording, tok, model_id="tiny-llama", context_length=CONTEXT, **options)
    return recording, app


def client_for(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)


def test_follow_up_turn_evaluates_only_the_new_tokens(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    recording, app = serve(engine_and_tokenizer)
    first_turn = [{"role": "user", "content": "Hello, who are you? Tell me about your day."}]
    with in_process_server(app) as url:
        client = client_for(url)
        answer = client.chat.completions.create(model="m", messages=first_turn, max_tokens=8, temperature=0)
        history = [*first_turn, {"role": "assistant", "content": answer.choices[0].message.content},
                   {"role": "user", "content": "Tell me more."}]
        cached = recording.cache_contents()
        recording.calls.clear()
        follow_up = client.chat.completions.create(model="m", messages=history, max_tokens=8, temperature=0)
    second_ids = tok.encode(tok.render_chat(history), add_bos=False)
    shared = common_prefix(cached, second_ids)
    prefill_pos, prefill_ids = recording.calls[0]
    assert prefill_pos == shared >= 30                        # the shared history came from the cache
    assert prefill_ids == second_ids[shared:]                 # and only the rest was evaluated
    assert follow_up.usage.prompt_tokens == len(second_ids)
    # the reused cache gives the answer a fresh run gives
    fresh_recording, fresh_app = serve(engine_and_tokenizer)
    with in_process_server(fresh_app) as url:
        fresh = client_for(url).chat.completions.create(model="m", messages=history, max_tokens=8, temperature=0)
    assert fresh_recording.calls[0] == (0, second_ids)
    assert fresh.choices[0].message.content == follow_up.choices[0].message.content


def test_identical_prompt_reuses_all_but_the_last_token(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    recording, app = serve(engine_and_tokenizer)
    with in_process_server(app) as url:
        client = client_for(url)
        a = client.completions.create(model="m", prompt="The same prompt", max_tokens=6, temperature=0)
        recording.calls.clear()
        b = client.completions.create(model="m", prompt="The same prompt", max_tokens=6, temperature=0)
    n = len(tok.encode("The same prompt"))
    assert recording.calls[0] == (n - 1, tok.encode("The same prompt")[-1:])
    assert a.choices[0].text == b.choices[0].text


def test_client_leaving_mid_stream_frees_the_engine_at_once(engine_and_tokenizer):
    """The engine runs only the forwards the test permits, one per /health round trip once the client has
    gone: the generation must stop within a few of them, far from the 200 tokens asked for."""
    engine, tok = engine_and_tokenizer
    gate = GatedEngine(engine)
    app = create_app(gate, tok, model_id="tiny-llama", context_length=CONTEXT)
    with in_process_server(app) as url:
        body = {"prompt": "Stream for a long time", "max_tokens": 200, "temperature": 1.0, "seed": 3, "stream": True}
        gate.release(2)  # the prompt and the first token
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # the connection is closed here
        assert drain_until_idle(url, gate, most=10) < 10
        evaluated = len(gate.calls)
        gate.open()
        quick = client_for(url).completions.create(model="m", prompt="next", max_tokens=3, temperature=0)
        assert quick.choices[0].finish_reason in ("stop", "length")
    pos, ids = gate.calls[evaluated]  # nothing ran for the departed client after it went idle
    assert ids == tok.encode("next")[pos:] and len(gate.calls) <= evaluated + 3


def test_client_giving_up_on_a_plain_request_frees_the_engine(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    gate = GatedEngine(engine)
    app = create_app(gate, tok, model_id="tiny-llama", context_length=CONTEXT)
    with in_process_server(app) as url:
        gate.release(1)
        with pytest.raises(httpx.ReadTimeout):  # the gate holds the answer: the client surely times out
            httpx.post(f"{url}/v1/completions", json={"prompt": "long", "max_tokens": 200, "temperature": 1.0,
                                                      "seed": 3},
                       timeout=0.3)
        assert drain_until_idle(url, gate, most=10) < 10
    assert len(gate.calls) < 12


def test_request_whose_client_left_while_queued_never_runs(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    gate = GatedEngine(engine)
    app = create_app(gate, tok, model_id="tiny-llama", context_length=CONTEXT)
    with in_process_server(app) as url:
        first = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                                 kwargs={"json": {"prompt": "first", "max_tokens": 20, "temperature": 1.0, "seed": 1},
                                         "timeout": 60})
        first.start()
        gate.wait_for_calls(1)  # the first request holds the engine (at the gate)
        with pytest.raises(httpx.ReadTimeout):  # waits behind the first request, then gives up
            httpx.post(f"{url}/v1/completions", json={"prompt": "queued and gone", "max_tokens": 5}, timeout=0.3)
        for _ in range(2):  # round trips on the event loop, which saw the disconnect before them
            httpx.get(f"{url}/health")
        gate.open()
        first.join(60)
        wait_until_idle(url, within_s=30)
    gone = tok.encode("queued and gone")
    assert all(ids != gone[pos:] for pos, ids in gate.calls)  # its prompt was never evaluated
    assert gate.calls[0][1] == tok.encode("first")


def wait_until_idle(url: str, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while httpx.get(f"{url}/health").json()["busy"]:
        assert time.monotonic() < deadline, f"the engine was still busy after {within_s} s"


def test_full_queue_answers_429_and_the_rest_complete(engine_and_tokenizer):
    """In order, by events: one runs (held at the gate), one waits (seen in /health), two find the queue full."""
    engine, tok = engine_and_tokenizer
    gate = GatedEngine(engine)
    app = create_app(gate, tok, model_id="tiny-llama", context_length=CONTEXT, max_queue=1)
    statuses: dict[int, tuple[int, dict]] = {}

    def post(i):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": f"job {i}", "max_tokens": 5, "temperature": 0},
                       timeout=60)
        statuses[i] = (r.status_code, r.json())

    with in_process_server(app) as url:
        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        threads[0].start()
        gate.wait_for_calls(1)
        threads[1].start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["queued"] != 1:
            assert time.monotonic() < deadline, "the second request never queued"
        for t in threads[2:]:
            t.start()
            t.join(60)
        gate.open()
        for t in threads[:2]:
            t.join(60)
    assert [statuses[i][0] for i in range(4)] == [200, 200, 429, 429]
    for code, body in statuses.values():
        if code == 429:
            assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"


def test_api_key_is_required_when_set(engine_and_tokenizer):
    _, app = serve(engine_and_tokenizer, api_key="s3cret")
    with in_process_server(app) as url:
        with pytest.raises(openai.AuthenticationError) as info:
            client_for(url, api_key="wrong").models.list()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200       # health needs no key
        reply = client_for(url, api_key="s3cret").completions.create(model="m", prompt="x", max_tokens=2)
        assert reply.usage.prompt_tokens > 0


class LosesConnection:
    """A root engine whose worker connection drops after `ok_calls` forwards."""

    def __init__(self, engine, ok_calls: int):
        self.engine, self.ok_calls = engine, ok_calls

    def forward(self, token_ids, pos, last_only=False):
        if self.ok_calls == 0:
            raise ConnectionResetError(104, "Connection reset by peer")
        self.ok_calls -= 1
        return self.engine.forward(token_ids, pos, last_only)


def test_lost_connection_gives_503_and_health_down(engine_and_tokenizer):
    engine, tok = engine_and_tokenizer
    app = create_app(LosesConnection(engine, ok_calls=3), tok, model_id="m", context_length=CONTEXT)
    with in_process_server(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 10}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "cluster_unavailable"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "down"
        assert "Connection reset" in health.json()["error"]
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=30).status_code == 503


class Broken:
    def forward(self, token_ids, pos, last_only=False):
        raise FloatingPointError("nan in layer 0")


def test_engine_bug_gives_500_and_server_keeps_serving(engine_and_tokenizer):
    _, tok = engine_and_tokenizer
    app = create_app(Broken(), tok, model_id="m", context_length=CONTEXT)
    with in_process_server(app) as url:
        for _ in range(2):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=30)
            assert r.status_code == 500 and "nan in layer 0" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
