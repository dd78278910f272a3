"""`dllama-run serve --workers`: the API in front of a 2-node loopback cluster (root + one
`dllama-run worker` process), and what a lost worker does to a request and to /health."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
from conftest import CONFORMANCE, require_fixtures
from serve_helpers import LOOPBACK, load_engine_and_tokenizer, local_generation, served_cluster, start_worker

from dllama.runtime.sampler import Sampling

MODEL_DIR = CONFORMANCE / "tiny-llama"   # 2 kv heads: splits over 2 nodes
MODEL = MODEL_DIR / "expected_f32.m"
CONTEXT = 256


@pytest.fixture
def cluster(tmp_path):
    require_fixtures(MODEL_DIR)
    tokenizer = tmp_path / "tiny-llama.t"
    with served_cluster(MODEL_DIR, tokenizer, CONTEXT) as (server, worker):
        yield server, worker, tokenizer


def test_two_node_cluster_answers_like_one_node(cluster):
    server, _, tokenizer = cluster
    engine, tok = load_engine_and_tokenizer(MODEL, tokenizer, CONTEXT)
    messages = [{"role": "user", "content": "Hello from the cluster"}]
    ids = tok.encode(tok.render_chat(messages), add_bos=False)
    single_node = tok.decode(local_generation(engine, tok, ids, 12, Sampling(temperature=0.0)))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == single_node
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=messages, max_tokens=12, temperature=0, stream=True))
    assert streamed == single_node
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_clusters_default_parallel_is_what_every_nodes_memory_holds(cluster):
    server, _, _ = cluster  # served without --parallel
    assert httpx.get(f"{server.url}/health").json()["parallel"] == 4  # KiBs of KV cache a slot: any node holds 4
    assert ("4 conversations at once (--parallel 4, what every node's memory holds): every node keeps a KV cache "
            f"slice of {CONTEXT} positions for each") in server.stderr_text()


def test_worker_lost_during_a_request_gives_503_and_health_down(cluster):
    server, worker, _ = cluster
    os.kill(worker.pid, signal.SIGSTOP)  # freeze the worker so the request is surely in flight
    result = {}

    def request():
        result["response"] = httpx.post(f"{server.url}/v1/completions", timeout=30,
                                        json={"prompt": "Once upon a time", "max_tokens": 50})

    thread = threading.Thread(target=request)
    thread.start()
    deadline = time.monotonic() + 60
    while not httpx.get(f"{server.url}/health", timeout=5).json()["generating"]:  # the root waits on the frozen worker
        assert time.monotonic() < deadline and thread.is_alive(), "the request never reached the engine"
    os.kill(worker.pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the request hung after its worker was lost"
    response = result["response"]
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "cluster_unavailable"
    health = httpx.get(f"{server.url}/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "down"
    assert f"{LOOPBACK}:" in health.json()["error"]          # names the lost worker
    assert "frozen" not in health.json()["error"]  # by its closed connection, not the progress timeout (SIGSTOP)
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "again"}, timeout=10).status_code == 503


def test_health_reports_a_worker_lost_while_idle(cluster):
    server, worker, _ = cluster
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200
    assert health.json()["workers"] == [{"address": f"{LOOPBACK}:{worker.port}", "node": 1, "status": "ok"}]
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 60  # bounded polling; the message below says how it was noticed
    while httpx.get(f"{server.url}/health").status_code != 503:
        assert time.monotonic() < deadline, "/health still says ok 60 s after the worker died"
    health = httpx.get(f"{server.url}/health").json()
    assert "closed the connection" in health["error"]
    assert health["workers"][0]["status"] == "down" and "closed the connection" in health["workers"][0]["error"]


def test_a_restarted_worker_is_reconnected_without_restarting_the_server(cluster):
    server, worker, tokenizer = cluster
    assert httpx.get(f"{server.url}/health").json()["reconnects"] == 0
    prompt = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    first = httpx.post(f"{server.url}/v1/completions", json=prompt, timeout=60)
    assert first.status_code == 200
    worker.kill()
    worker.wait()
    gone = httpx.post(f"{server.url}/v1/completions", json=prompt, timeout=30)
    assert gone.status_code == 503 and "reconnects by itself" in gone.json()["error"]["message"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "down" and "reconnecting" in health
    deadline = time.monotonic() + 60
    while "last attempt" not in (health := httpx.get(f"{server.url}/health").json()).get("reconnecting", ""):
        assert time.monotonic() < deadline, "no reconnection attempt in 60 s"  # one failed while it is away
    assert health["status"] == "down" and health["reconnects"] == 0
    assert httpx.post(f"{server.url}/v1/completions", json=prompt, timeout=30).status_code == 503
    back, _ = start_worker(worker.port)  # the same address, as a board that rebooted
    try:
        deadline = time.monotonic() + 60
        while (reply := httpx.post(f"{server.url}/v1/completions", json=prompt, timeout=60)).status_code == 503:
            assert time.monotonic() < deadline, "still 503 60 s after the worker came back"
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]  # the same cluster again
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "ok" and health["reconnects"] == 1
    finally:
        back.kill()
        back.wait()

