"""A cluster carries Engine.step's batch (issue 25): every pass is one FORWARD (each token with its KV cache slot
and position) and one exchange per seam for all its sequences, and every worker keeps each slot's slice of the
KV cache. A request's greedy answer is the one it gets alone on the same cluster, beside 1, 3 or 7 others that
start and stop at other times (SmolLM2 q40, f32 buffers, 2 and 3 nodes); `serve --parallel` on a cluster answers
as alone, frees a departed client's slot at once, and fails every active request with 503 when a worker is lost,
then reconnects."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures
from distributed_helpers import loopback_workers
from serve_helpers import complete, served_cluster, side_by_side, start_worker

from dllama.runtime.batching import generate_many
from dllama.runtime.distributed.root import DistributedEngine
from dllama.runtime.generate import generate

RNG = np.random.default_rng(2025)
# a prompt read in two passes beside others' decoding (70 tokens), one of a single token, short answers and long
PROMPTS = [list(map(int, RNG.integers(2, 49000, size=n))) for n in (9, 3, 70, 1, 20, 5, 40, 2, 11)]
LIMITS = [10, 17, 4, 12, 8, 20, 2, 15, 9]


class CountingCluster(DistributedEngine):
    """Notes how many sequences each step carried."""

    def step(self, runs):
        self.sizes.append(len(runs))
        return super().step(runs)


def cluster(path, workers, slots: int) -> CountingCluster:
    engine = CountingCluster(path, [w.address for w in workers], max_seq_len=128, buffer_type="f32", nthreads=1,
                             slots=slots, log=lambda msg: None)
    engine.sizes = []
    return engine


@pytest.mark.parametrize("n_nodes", [2, 3])
def test_greedy_tokens_on_a_cluster_are_the_same_beside_1_3_or_7_others(smollm2_files, n_nodes):
    path = smollm2_files["q40"]
    with loopback_workers(n_nodes - 1, model_path=path, nthreads=1) as workers:  # a core each, as the root
        with cluster(path, workers, 1) as alone:
            expected = []
            for prompt, limit in zip(PROMPTS, LIMITS):
                alone.reset()
                expected.append(list(generate(alone, prompt, limit)))
            tokens = alone.traffic.tokens
        for slots in (2, 4, 8):
            with cluster(path, workers, slots) as engine:
                assert generate_many(engine, PROMPTS, LIMITS) == expected, f"{slots} slots on {n_nodes} nodes"
                assert max(engine.sizes) == slots  # the slots really shared steps
                assert engine.traffic.tokens == tokens  # the same tokens went to the workers, in fewer FORWARDs


MODEL_DIR = CONFORMANCE / "tiny-llama"  # 2 kv heads: splits over 2 nodes
CONTEXT = 256
SERVE_PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3, 4,", "Write a poem about the sea",
                 "Hello", "Why?"]
SERVE_LIMITS = [40, 12, 25, 33, 8, 28]
LONG = 60  # tokens of an answer beside a departing client's that would run ~170 (to its eos)


@pytest.fixture
def cluster_serving_4(tmp_path):
    """`dllama-run serve --parallel 4` in front of a root and one `dllama-run worker` process, f32 buffers."""
    require_fixtures(MODEL_DIR)
    with served_cluster(MODEL_DIR, tmp_path / "tiny-llama.t", CONTEXT, "--parallel", "4") as (server, worker):
        yield server, worker


def wait_until(condition, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_serve_parallel_on_a_cluster_answers_as_alone_and_frees_a_departed_clients_slot(cluster_serving_4):
    server, worker = cluster_serving_4
    alone: dict = {}
    for i, (p, n) in enumerate(zip(SERVE_PROMPTS + ["Why?"], SERVE_LIMITS + [LONG])):
        complete(server.url, p, n, alone, i)
    together = side_by_side(server.url, SERVE_PROMPTS, SERVE_LIMITS)
    assert [text(together[i]) for i in range(len(SERVE_PROMPTS))] == \
        [text(alone[i]) for i in range(len(SERVE_PROMPTS))]
    assert "4 conversations at once (--parallel 4)" in server.stderr_text()

    # a departing client: its stream runs, the worker is frozen (every step waits), another request joins, the
    # client leaves and the worker goes on. Had the stream kept its slot to its end, the other's far shorter
    # answer would end first.
    results: dict = {}
    other = threading.Thread(target=complete, args=(server.url, "Why?", LONG, results, "other"))
    body = {"prompt": "Stream for a long time", "max_tokens": 236, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped line iterator closes the stream
        assert next(lines).startswith("data: ")
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            assert generating(server) == 1, "the stream ended before the worker was frozen"
            other.start()
            wait_until(lambda: generating(server) == 2, "the second request never started beside the first", 3)
        except BaseException:
            os.kill(worker.pid, signal.SIGCONT)
            raise
    os.kill(worker.pid, signal.SIGCONT)  # within the root's 6 s of patience with a silent worker
    wait_until(lambda: generating(server) < 2 or not other.is_alive(), "the departed client's slot stayed busy")
    assert other.is_alive(), "the departed client's slot stayed busy while the other request generated"
    other.join()
    assert text(results["other"]) == text(alone[len(SERVE_PROMPTS)])


def generating(server) -> int:
    return httpx.get(f"{server.url}/health").json()["generating"]


def test_a_lost_worker_fails_every_active_request_with_503_and_serve_reconnects(cluster_serving_4):
    server, worker = cluster_serving_4
    first = text(httpx.post(f"{server.url}/v1/completions", timeout=60,
                            json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}))
    os.kill(worker.pid, signal.SIGSTOP)  # the requests' steps wait on it, surely in flight
    results: dict = {}
    threads = [threading.Thread(target=complete, args=(server.url, p, 100, results, i))
               for i, p in enumerate(SERVE_PROMPTS[:3])]
    for t in threads:
        t.start()
    wait_until(lambda: generating(server) == 3,
               "three requests never generated side by side", seconds=5)
    os.kill(worker.pid, signal.SIGKILL)
    for t in threads:
        t.join(15)
        assert not t.is_alive(), "a request hung after its worker was lost"
    for i in range(3):
        assert results[i].status_code == 503 and results[i].json()["error"]["code"] == "cluster_unavailable"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "down" and "frozen" not in health["error"]  # its closed connection, not a timeout
    worker.wait()
    back, _ = start_worker(worker.port)  # the same address, as a board that rebooted
    try:
        deadline = time.monotonic() + 60
        prompt = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        while (reply := httpx.post(f"{server.url}/v1/completions", json=prompt, timeout=60)).status_code == 503:
            assert time.monotonic() < deadline, "still 503 60 s after the worker came back"
        assert text(reply) == first
        health = httpx.get(f"{server.url}/health").json()
        assert (health["status"], health["reconnects"], health["parallel"]) == ("ok", 1, 4)
        again = side_by_side(server.url, SERVE_PROMPTS[:3], [8, 8, 8])  # every slot works again
        assert text(again[0]) == first
    finally:
        back.kill()
        back.wait()
