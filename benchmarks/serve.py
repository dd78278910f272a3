"""What the API server costs on top of the engine, and how it holds up under load.

    python benchmarks/serve.py                                   # tiny-llama fixture (f32)
    python benchmarks/serve.py --model M.m --tokenizer T.t --tokens 32 --nthreads 2

Measures, on one machine: ms per generated token by generate() in-process vs through
`dllama-run serve` (non-streamed and streamed, same greedy request), time to first streamed
token, a follow-up prompt that extends the previous one, with and without the KV cache reuse, a load test (requests
from concurrent openai clients, latency percentiles, server RSS before and after), and /health's slowest answer
while a 10 MB prompt is sent, parsed and refused (issue 28: <= 0.5 s). Results go
to stdout as one JSON object; record them in docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import openai  # noqa: E402
from serve_helpers import HealthWatch, ServerProcess  # noqa: E402

from dllama.runtime.engine import Engine  # noqa: E402
from dllama.runtime.generate import generate  # noqa: E402
from dllama.tokenizer import Tokenizer  # noqa: E402
from dllama.tokenizer.from_hf import convert_tokenizer  # noqa: E402

FIXTURE = ROOT.parent / "shared" / "fixtures" / "conformance" / "tiny-llama"
PROMPT = "Once upon a time, in a small village by the sea, there lived"


def direct_ms_per_token(model: Path, tokenizer: Path, tokens: int, max_seq_len: int, nthreads: int | None) -> float:
    engine = Engine.load(str(model), max_seq_len=max_seq_len, nthreads=nthreads)
    tok = Tokenizer.load(str(tokenizer))
    ids = tok.encode(PROMPT)
    list(generate(engine, ids, 4))  # warm up the kernels for this batch size
    engine.reset()
    start = time.perf_counter()
    produced = len(list(generate(engine, ids, tokens)))
    return 1000 * (time.perf_counter() - start) / produced


def api_ms_per_token(client: openai.OpenAI, tokens: int) -> dict:
    # a different prompt each time, so no request reuses the previous one's cache
    start = time.perf_counter()
    reply = client.completions.create(model="m", prompt=PROMPT + " a cat", max_tokens=tokens, temperature=0)
    non_stream = 1000 * (time.perf_counter() - start) / reply.usage.completion_tokens
    start = time.perf_counter()
    first, pieces = None, 0
    for chunk in client.completions.create(model="m", prompt=PROMPT + " a dog", max_tokens=tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            pieces = chunk.usage.completion_tokens
    stream = 1000 * (time.perf_counter() - start) / pieces
    return {"api_ms_per_token": round(non_stream, 2), "api_stream_ms_per_token": round(stream, 2),
            "api_first_token_ms": round(1000 * first, 1)}


def follow_up_turn(client: openai.OpenAI, tokens: int, slots: int) -> dict:
    # completions rather than chat, so that tokenizers without a chat template work too
    first = PROMPT + " " + "and the story went on. " * 8
    answer = client.completions.create(model="m", prompt=first, max_tokens=tokens, temperature=0).choices[0].text
    follow_up = first + answer + " What happened next?"
    start = time.perf_counter()
    warm = client.completions.create(model="m", prompt=follow_up, max_tokens=1, temperature=0)
    reused_ms = 1000 * (time.perf_counter() - start)
    for i in range(slots):  # evict the conversation from every KV cache slot (serve --parallel)
        client.completions.create(model="m", prompt=f"something unrelated {i}", max_tokens=1)
    start = time.perf_counter()
    client.completions.create(model="m", prompt=follow_up, max_tokens=1, temperature=0)
    fresh_ms = 1000 * (time.perf_counter() - start)
    return {"follow_up_prompt_tokens": warm.usage.prompt_tokens, "follow_up_ms_with_cache": round(reused_ms, 1),
            "follow_up_ms_without_cache": round(fresh_ms, 1)}


# RssFile grows as sampled tokens touch new rows of the memory-mapped embedding (clean page
# cache, bounded by the file); a leak would show in RssAnon
RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def load_test(server: ServerProcess, requests: int, clients: int, tokens: int) -> dict:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=5, timeout=600)

    def one(i: int) -> float:
        start = time.perf_counter()
        client.completions.create(model="m", prompt=f"{PROMPT} request {i}", max_tokens=tokens, seed=i)
        return time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients * 2)))
    rss_before = {field: server.rss_bytes(field) for field in RSS_FIELDS}
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    rss_after = {field: server.rss_bytes(field) for field in RSS_FIELDS}
    return {"load_requests": requests, "load_clients": clients, "load_requests_per_s": round(requests / wall, 2),
            "load_latency_p50_ms": round(1000 * statistics.median(latencies), 1),
            "load_latency_p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
            **{f"{field}_before_mib": round(rss_before[field] / 2**20, 1) for field in RSS_FIELDS},
            **{f"{field}_after_mib": round(rss_after[field] / 2**20, 1) for field in RSS_FIELDS}}


def health_during_big_prompts(server: ServerProcess, rounds: int) -> dict:
    """/health asked again and again from a thread while a 10 MB chat prompt is posted and refused, `rounds` times:
    the slowest answer of each round."""
    big = json.dumps({"messages": [{"role": "user", "content": "many words " * 1_000_000}]}).encode()
    slowest, answers = [], 0
    for _ in range(rounds):
        with HealthWatch(server.url) as watch:
            while watch.answers == 0 and not watch.failures:
                time.sleep(0.01)
            status = httpx.post(server.url + "/v1/chat/completions", content=big, timeout=120).status_code
        if watch.failures or status != 400:
            raise RuntimeError(f"/health failed or the prompt was not refused ({status}): {watch.failures[:3]}")
        slowest.append(watch.slowest)
        answers += watch.answers
    return {"big_prompt_bytes": len(big), "health_answers": answers,
            "health_slowest_ms_per_round": [round(1000 * s, 1) for s in slowest]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=FIXTURE / "expected_f32.m")
    ap.add_argument("--tokenizer", type=Path,
                    help="default: the fixture's tokenizer, converted with its HF tokenizer embedded")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--nthreads", type=int)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--health-rounds", type=int, default=5, help="10 MB prompts sent while /health is timed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = Path(tmp) / "tiny-llama.t"
            tokenizer.write_bytes(convert_tokenizer(FIXTURE).to_bytes())
        machine = f"{platform.machine()} {platform.processor() or ''} cores={__import__('os').cpu_count()}".strip()
        results = {"machine": machine,
                   "model": args.model.name, "tokens": args.tokens}
        results["direct_ms_per_token"] = round(direct_ms_per_token(args.model, tokenizer, args.tokens, args.max_seq_len,
                                                                   args.nthreads), 2)
        extra = ["--nthreads", str(args.nthreads)] if args.nthreads else []
        server = ServerProcess("--model", str(args.model), "--tokenizer", str(tokenizer), "--max-seq-len",
                               str(args.max_seq_len), "--max-queue", str(args.clients), *extra)
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
            client.completions.create(model="m", prompt=PROMPT, max_tokens=4)  # warm up (kernels for this batch size)
            results.update(api_ms_per_token(client, args.tokens))
            slots = httpx.get(f"{server.url}/health").json().get("parallel", 1)
            results.update(follow_up_turn(client, args.tokens, slots))
            results.update(load_test(server, args.requests, args.clients, args.tokens))
            results.update(health_during_big_prompts(server, args.health_rounds))
        finally:
            server.stop()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
