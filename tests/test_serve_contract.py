"""What docs/API.md promises that no other test reached: the default 16 MiB body limit at its edge,
prompts given as token ids, the key taken from DLLAMA_API_KEY, and an engine failure in the middle of a
stream. The app runs on uvicorn in a thread with real loopback sockets (the key: a real server process)."""
from __future__ import annotations

import inspect
import json
import os

import httpx
import pytest
from conftest import CONFORMANCE, require_fixtures
from serve_helpers import RecordingEngine, ServerProcess, in_process_server, load_engine_and_tokenizer, local_generation

from dllama.runtime.sampler import Sampling
from dllama.runtime.serve import create_app
from dllama.tokenizer.from_hf import convert_tokenizer

MODEL_DIR = CONFORMANCE / "tiny-llama"
CONTEXT = 256
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    require_fixtures(MODEL_DIR)
    path = tmp_path_factory.mktemp("contract") / "tiny-llama.t"
    path.write_bytes(convert_tokenizer(MODEL_DIR).to_bytes())
    return path


@pytest.fixture(scope="module")
def engine_and_tokenizer(tokenizer_path):
    return load_engine_and_tokenizer(MODEL_DIR / "expected_f32.m", tokenizer_path, CONTEXT)


def padded_to(body: dict, size: int) -> bytes:
    """`body` as JSON with trailing spaces up to exactly `size` bytes (still one valid JSON document)."""
    data = json.dumps(body).encode()
    return data + b" " * (size - len(data))


def test_the_default_body_limit_is_16_mib_to_the_byte(engine_and_tokenizer):
    """Both the CLI's default and the app's: 16 MiB passes, one byte more is a 413, declared or chunked."""
    from dllama.cli.run_serve import serve_command

    assert inspect.signature(serve_command).parameters["max_body_mib"].default.default == 16.0
    engine, tok = engine_and_tokenizer
    app = create_app(engine, tok, model_id="m", context_length=CONTEXT)  # the default limits
    body = {"prompt": "hi", "max_tokens": 1, "temperature": 0}
    with in_process_server(app) as url, httpx.Client(timeout=60) as client:
        at_limit = client.post(f"{url}/v1/completions", content=padded_to(body, 16 * MiB))
        assert at_limit.status_code == 200, at_limit.text
        over = client.post(f"{url}/v1/completions", content=padded_to(body, 16 * MiB + 1))
        assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"
        whole = padded_to(body, 16 * MiB + 1)
        chunked = client.post(f"{url}/v1/completions", content=(whole[i:i + MiB] for i in range(0, len(whole), MiB)))
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives


def test_a_prompt_of_token_ids_is_evaluated_as_those_ids(engine_and_tokenizer):
    """The ids go to the engine as given (no bos added, none re-encoded) and the answer is generate()'s."""
    engine, tok = engine_and_tokenizer
    ids = tok.encode("Once upon a time, in a land", add_bos=False)[:6] + [7, 300]
    recording = RecordingEngine(engine)
    app = create_app(recording, tok, model_id="m", context_length=CONTEXT)
    with in_process_server(app) as url:
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0},
                           timeout=60).json()
    assert recording.calls[0] == (0, ids)
    assert reply["usage"]["prompt_tokens"] == len(ids)
    expected = local_generation(engine, tok, ids, 6, Sampling(temperature=0.0))
    assert reply["choices"][0]["text"] == tok.decode(expected)


class FailsAfter:
    """An engine whose forward raises after `ok_calls` good ones (a bug in the middle of an answer)."""

    def __init__(self, engine, ok_calls: int):
        self.engine, self.ok_calls = engine, ok_calls

    def forward(self, token_ids, pos, last_only=False):
        if self.ok_calls == 0:
            raise FloatingPointError("nan in layer 1")
        self.ok_calls -= 1
        return self.engine.forward(token_ids, pos, last_only)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_an_engine_error_mid_stream_ends_it_with_an_error_event_and_no_done(engine_and_tokenizer):
    """The 200 and the first tokens are gone when the engine fails: the stream's last event is the error
    (OpenAI's shape), [DONE] never comes, and the server serves the next request."""
    engine, tok = engine_and_tokenizer
    app = create_app(FailsAfter(engine, ok_calls=4), tok, model_id="m", context_length=CONTEXT)
    body = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0, "stream": True}
    with in_process_server(app) as url, httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = sse_events(response)
        assert "[DONE]" not in events and len(events) >= 3  # prompt + 3 tokens went out before the failure
        texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
        assert all(isinstance(t, str) for t in texts) and "".join(texts)
        error = json.loads(events[-1])["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "engine_error"
        assert "nan in layer 1" in error["message"]
        assert client.get(f"{url}/health").json()["status"] == "ok"


def test_the_api_key_comes_from_dllama_api_key(tokenizer_path):
    env = dict(os.environ, DLLAMA_API_KEY="key-from-the-environment")
    server = ServerProcess("--model", str(MODEL_DIR / "expected_f32.m"), "--tokenizer", str(tokenizer_path),
                           "--max-seq-len", str(CONTEXT), env=env)
    try:
        body = {"prompt": "x", "max_tokens": 1}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 401
        ok = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60,
                        headers={"Authorization": "Bearer key-from-the-environment"})
        assert ok.status_code == 200
    finally:
        server.stop()
