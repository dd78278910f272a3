"""Many clients at once: `dllama-run serve --parallel N` beside llama.cpp's `llama-server -np N`.

    python benchmarks/serve_concurrency.py [--models tinyllama,smollm2] [--clients 1,2,4,8] [--tokens 128]
                                           [--parallel 4] [--threads 2] [--rounds 2]

On one machine, same weights on both sides (the GGUF Q4_0 file and the .m holding its blocks, made as
benchmarks/vs_llamacpp.py makes them), same prompts, greedy, `--tokens` generated per request with
the end of sequence banned (logit_bias -100 and llama.cpp's ignore_eos): for each number of
concurrent clients, each sends one streamed /v1/completions request at the same moment. Printed per
server and client count: aggregate generated tokens/s (all tokens / the round's wall time), time to
first token p50 / p95, and the inter-token time p50 (the gaps between streamed chunks). The two
servers run side by side and take turns, dllama first, for each client count (paired in one run);
the best of `--rounds` rounds is kept. Beside each 1-client round, the rate at which a token could go if
it cost only reading its weights (vs_llamacpp.py's read limit, measured before and after the round): one
stream's decode is bound by memory, whose read rate on a shared machine moves from minute to minute, and
with it the "x 1 client" column. Then dllama's peak RSS (VmHWM) beside what `dllama-run plan
--parallel N --serve` predicts and weights + N x one slot's KV cache + 60 MB. `--no-llamacpp` runs dllama
alone, on models it converts itself (own_files), where llama.cpp is not built. Run under `flock
/tmp/dllama-bench.lock`: the machine is shared and only ratios within one run mean much.

    python benchmarks/serve_concurrency.py --netem 4 [--profile pi3] [--models tinyllama] ...   # as root

runs `dllama-run serve --parallel N --workers ...` on a cluster of that many nodes instead, each in its own
network namespace behind an emulated Pi link (benchmarks/netem.py; one thread per node), the clients in the
root's namespace. Where the kernel has no netem the links get their rate but not their delay: each round
then adds, per engine step (the server's dllama_engine_steps), the profile's one-way delay times the
one-way network steps of a pass of the mesh exchange (x out, one per seam, logits back: 2 + 2 x layers),
to the round's wall time (aggregate) and to each inter-token gap; both columns are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_helpers import LOOPBACK, ServerProcess, free_port, wait_for_health  # noqa: E402
from vs_llamacpp import BENCH, llamacpp_bin, model_pair, read_limit  # noqa: E402
from vs_reference import bytes_per_token  # noqa: E402

PROMPTS = ["Once upon a time, in a small village by the sea, there lived", "The history of the Roman empire begins",
           "Here is a recipe for a simple bread:", "The three laws of motion say that",
           "My favourite programming language is", "In the year 2050, cities will", "A letter to my younger self:",
           "The best way to learn to play the piano is"]
MiB = 1 << 20


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pair(bin_dir: Path, model: str) -> tuple[Path, Path]:
    """(GGUF Q4_0, .m q40) holding the same blocks: vs_llamacpp.py's, made by it unless both are there."""
    gguf, m = BENCH / f"{model}-Q4_0.gguf", BENCH / f"dllama_model_{model}-q40_q40.m"
    return (gguf, m) if gguf.is_file() and m.is_file() else model_pair(bin_dir, model, "q40")


def own_files(model: str) -> tuple[Path, Path]:
    """(.m q40, .t) that dllama converts alone, for --no-llamacpp where llama.cpp is not built: the TinyLlama-shaped
    checkpoint of benchmarks/decode.py with Llama 2's tokenizer (fixtures), or SmolLM2 from the sample GGUF
    (its Q4_1 blocks re-encoded as q40). The same shapes and bytes per weight as the GGUF pair, other values."""
    from decode import ensure_model

    from dllama.converter.convert import convert
    from dllama.samples import fetch

    own = BENCH / "own"
    if model == "tinyllama":
        m, t = ensure_model(), own / "dllama_tokenizer_llama2.t"
        source, quant = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "llama2", None
    else:
        m, t = own / f"dllama_model_{model}_q40.m", own / f"dllama_tokenizer_{model}.t"
        source, quant = fetch(quiet=True), "q40"
    if not (m.is_file() and t.is_file()):
        convert(source, quant, own, name="llama2" if quant is None else model)
    return m, t


def tokenizer_for(gguf: Path, model: str) -> Path:
    """The .t of the GGUF's vocabulary (dllama-convert tokenizer), once."""
    target = BENCH / f"dllama_tokenizer_{model}.t"
    if not target.is_file():
        subprocess.run(["dllama-convert", "tokenizer", str(gguf), "--name", model, "--output-dir", str(BENCH)],
                       check=True, stdout=subprocess.DEVNULL)
    return target


class LlamaServer:
    """llama-server -np N on a free loopback port."""

    def __init__(self, bin_dir: Path, gguf: Path, parallel: int, threads: int, context: int):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(gguf), "-t", str(threads), "-np",
                                      str(parallel), "-c", str(context * parallel), "--host", LOOPBACK, "--port",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_health(self.url, self.proc)
        deadline = time.monotonic() + 120
        while httpx.get(f"{self.url}/health").status_code != 200:  # 503 while loading
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become ready")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def one_request(url: str, prompt: str, tokens: int, eos: int, out: list, start: threading.Event) -> None:
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "logit_bias": {str(eos): -100}, "ignore_eos": True}
    start.wait()
    sent = time.perf_counter()
    stamps, finish = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = (json.loads(line[6:]).get("choices") or [{}])[0]
            if choice.get("text"):
                stamps.append(time.perf_counter())
            finish = choice.get("finish_reason") or finish
    out.append({"sent": sent, "stamps": stamps, "end": time.perf_counter(), "finish": finish})


def round_of(url: str, clients: int, tokens: int, eos: int) -> dict:
    start, out = threading.Event(), []
    threads = [threading.Thread(target=one_request, args=(url, PROMPTS[i % len(PROMPTS)], tokens, eos, out, start))
               for i in range(clients)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    if any(r["finish"] != "length" for r in out):
        raise RuntimeError(f"a request stopped before {tokens} tokens: {[r['finish'] for r in out]}")
    wall = max(r["end"] for r in out) - min(r["sent"] for r in out)
    ttft = sorted(r["stamps"][0] - r["sent"] for r in out)
    gaps = sorted(b - a for r in out for a, b in zip(r["stamps"], r["stamps"][1:]))
    return {"clients": clients, "tok_s": clients * tokens / wall, "ttft_p50": percentile(ttft, 50),
            "ttft_p95": percentile(ttft, 95), "itl_p50": percentile(gaps, 50)}


def percentile(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def plan_total(m: Path, seq: int, parallel: int) -> dict:
    out = subprocess.run(["dllama-run", "plan", "--model", str(m), "--nodes", "1", "--max-seq-len", str(seq),
                          "--parallel", str(parallel), "--serve", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["per_node"][0]


def peak_rss_alone(m: Path, t: Path, seq: int, args, eos: int) -> int:
    """VmHWM of dllama-run serve --parallel 1 after one request of args.tokens tokens."""
    server = ServerProcess("--model", str(m), "--tokenizer", str(t), "--threads", str(args.threads), "--parallel", "1",
                           "--max-seq-len", str(seq))
    try:
        round_of(server.url, 1, args.tokens, eos)
        return server.rss_bytes("VmHWM")
    finally:
        server.stop()


def engine_steps(url: str) -> float:
    """The server's engine steps so far (/metrics dllama_engine_steps)."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("dllama_engine_steps "):
            return float(line.split()[1])
    raise RuntimeError("the server's /metrics has no dllama_engine_steps")


def client_rounds(args) -> None:
    """--client-of URL (inside the root's namespace): warm-up, then the rounds; one JSON line per client count,
    with the engine steps the best round took."""
    url = args.client_of
    wait_for_health(url, timeout=600)
    round_of(url, 1, 8, args.eos)
    round_of(url, min(args.parallel, 4), 8, args.eos)
    for clients in [int(c) for c in args.clients.split(",")]:
        best = None
        for _ in range(args.rounds):
            before = engine_steps(url)
            r = round_of(url, clients, args.tokens, args.eos)
            r["steps"] = engine_steps(url) - before
            if best is None or r["tok_s"] > best["tok_s"]:
                best = r
        print(json.dumps(best), flush=True)


def netem_cluster(args, bin_dir: Path, model: str, seq: int) -> list[dict]:
    """The rounds against `dllama-run serve --parallel N` on an emulated cluster of args.netem nodes."""
    from netem import PROFILES, NetemCluster

    from dllama.formats import ModelFile
    from dllama.tokenizer import Tokenizer

    gguf, m = pair(bin_dir, model)
    t = tokenizer_for(gguf, model)
    eos = Tokenizer.load(str(t)).eos_ids[0]
    profile = PROFILES[args.profile]
    passes = 2 + 2 * ModelFile(m).header.n_layers  # one-way network steps of one engine step (the mesh)
    procs: list[subprocess.Popen] = []
    with NetemCluster(args.netem, profile) as net:
        try:
            for i in range(1, args.netem):
                w = net.popen(i, ["dllama-run", "worker", "--host", net.address(i), "--port", "9999", "--model",
                                  str(m), "--nthreads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
                procs.append(w)
                if "listening" not in w.stderr.readline():
                    raise RuntimeError(f"worker {i} did not start")
                threading.Thread(target=w.stderr.read, daemon=True).start()
            workers = ",".join(f"{net.address(i)}:9999" for i in range(1, args.netem))
            url = f"http://{net.address(0)}:8080"
            procs.append(net.popen(0, ["dllama-run", "serve", "--model", str(m), "--tokenizer", str(t), "--workers",
                                       workers, "--parallel", str(args.parallel), "--threads", "1", "--host",
                                       net.address(0), "--port", "8080", "--max-seq-len", str(seq), "--max-queue",
                                       "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            out = subprocess.run(net.command(0, [sys.executable, __file__, "--client-of", url, "--eos", str(eos),
                                                 "--clients", args.clients, "--tokens", str(args.tokens),
                                                 "--parallel", str(args.parallel), "--rounds", str(args.rounds)]),
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"the clients failed: {out.stderr[-2000:]}")
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
        added_ms = 0.0 if net.emulates_delay else profile.delay_ms * passes
    rows = []
    for line in out.stdout.splitlines():
        r = json.loads(line)
        wall = r["clients"] * args.tokens / r["tok_s"]
        r.update(model=model, server=f"dllama {args.netem} nodes", added_ms_per_step=added_ms,
                 tok_s_measured=r["tok_s"], tok_s=r["clients"] * args.tokens / (wall + r["steps"] * added_ms / 1e3),
                 itl_p50_measured=r["itl_p50"], itl_p50=r["itl_p50"] + added_ms / 1e3,
                 ttft_p50=r["ttft_p50"] + added_ms / 1e3, ttft_p95=r["ttft_p95"] + added_ms / 1e3)
        say(json.dumps(r))
        rows.append(r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tinyllama,smollm2")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--netem", type=int, default=0, help="nodes of an emulated cluster (root only)")
    parser.add_argument("--profile", default="pi3", help="netem.PROFILES: the cluster's links")
    parser.add_argument("--client-of", help=argparse.SUPPRESS)  # the cluster's clients, inside its namespace
    parser.add_argument("--eos", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_of:
        return client_rounds(args)
    from dllama.tokenizer import Tokenizer

    bin_dir = None if args.no_llamacpp and not args.netem else llamacpp_bin()
    seq = 64 + args.tokens  # every prompt is under 64 tokens: the KV cache the runs fill
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; {args.tokens} greedy tokens per request, "
          f"--parallel / -np {args.parallel}, {args.threads} threads, context {seq} per slot; best of {args.rounds}")
    if args.netem:
        return print_cluster_table([row for model in args.models.split(",")
                                    for row in netem_cluster(args, bin_dir, model, seq)], args)
    results = []
    for model in args.models.split(","):
        if bin_dir is None:
            gguf, (m, t) = None, own_files(model)
        else:
            gguf, m = pair(bin_dir, model)
            t = tokenizer_for(gguf, model)
        say(f"{model}: {m}, {t}")
        per_token = bytes_per_token(m)
        eos = Tokenizer.load(str(t)).eos_ids[0]
        ours = ServerProcess("--model", str(m), "--tokenizer", str(t), "--threads", str(args.threads), "--parallel",
                             str(args.parallel), "--max-seq-len", str(seq), "--max-queue", "64")
        theirs = None if args.no_llamacpp else LlamaServer(bin_dir, gguf, args.parallel, args.threads, seq)
        servers = [("dllama", ours.url)] + ([] if theirs is None else [("llama.cpp", theirs.url)])
        try:
            for _, url in servers:  # warm-up: kernels, page cache, programs
                round_of(url, 1, 8, eos)
                round_of(url, min(args.parallel, 4), 8, eos)
            for clients in [int(c) for c in args.clients.split(",")]:
                best: dict[str, dict] = {}
                for _ in range(args.rounds):
                    for name, url in servers:
                        limit = read_limit(per_token, args.threads) if clients == 1 else None
                        r = round_of(url, clients, args.tokens, eos)
                        if limit is not None:  # the read rate beside a memory-bound round: before and after it
                            r["read_limit"] = (limit + read_limit(per_token, args.threads)) / 2
                        if name not in best or r["tok_s"] > best[name]["tok_s"]:
                            best[name] = r
                for name, r in best.items():
                    results.append({"model": model, "server": name, **r})
                    say(json.dumps(results[-1]))
            rss = ours.rss_bytes("VmHWM")
        finally:
            ours.stop()
            if theirs is not None:
                theirs.stop()
        rss_one = peak_rss_alone(m, t, seq, args, eos)
        plan = plan_total(m, seq, args.parallel)
        one_slot = plan_total(m, seq, 1)["kv_cache"]
        bound = plan["weights"] + args.parallel * one_slot + 60 * MiB
        results.append({"model": model, "server": "dllama", "peak_rss_mib": rss / MiB, "plan_mib": plan["total"] / MiB,
                        "bound_mib": bound / MiB, "rss_vs_plan": rss / plan["total"],
                        "peak_rss_parallel_1_mib": rss_one / MiB, "slot_kv_mib": one_slot / MiB})
        say(json.dumps(results[-1]))
    print("| model | server | clients | aggregate tok/s | x 1 client | TTFT p50 ms | TTFT p95 ms "
          "| inter-token p50 ms | 1 client / read limit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "clients" not in r:
            continue
        single = next((x["tok_s"] for x in results if x.get("clients") == 1 and x["model"] == r["model"]
                       and x["server"] == r["server"]), None)  # None: --clients without 1
        ratio = "-" if single is None else f"{r['tok_s'] / single:.2f}"
        of_limit = f"{r['tok_s'] / r['read_limit']:.2f} of {r['read_limit']:.0f}" if "read_limit" in r else "-"
        print(f"| {r['model']} q40 | {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {ratio} "
              f"| {r['ttft_p50'] * 1e3:.0f} | {r['ttft_p95'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.0f} | {of_limit} |")
    for r in results:
        if "peak_rss_mib" in r:
            print(f"{r['model']}: dllama serve --parallel {args.parallel} peak RSS {r['peak_rss_mib']:.0f} MiB; plan "
                  f"{r['plan_mib']:.0f} MiB (RSS / plan {r['rss_vs_plan']:.2f}); weights + N x KV + 60 MB "
                  f"{r['bound_mib']:.0f} MiB; --parallel 1 (one client) {r['peak_rss_parallel_1_mib']:.0f} MiB: "
                  f"{args.parallel - 1} more slots cost {r['peak_rss_mib'] - r['peak_rss_parallel_1_mib']:.1f} MiB "
                  f"for {(args.parallel - 1) * r['slot_kv_mib']:.1f} MiB of KV cache")
    print(f"load after the runs: {os.getloadavg()[0]:.2f}")


def print_cluster_table(rows: list[dict], args) -> None:
    print(f"cluster of {args.netem} nodes, profile {args.profile}, one thread per node; "
          f"{'delay added per engine step' if rows and rows[0]['added_ms_per_step'] else 'delay emulated'}")
    print("| model | clients | aggregate tok/s | x 1 client | as measured (no delay) | x 1 client | engine steps "
          "| TTFT p50 ms | TTFT p95 ms | inter-token p50 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = next(x for x in rows if x["clients"] == 1 and x["model"] == r["model"])
        print(f"| {r['model']} q40 | {r['clients']} | {r['tok_s']:.2f} | {r['tok_s'] / one['tok_s']:.2f} "
              f"| {r['tok_s_measured']:.2f} | {r['tok_s_measured'] / one['tok_s_measured']:.2f} | {r['steps']:.0f} "
              f"| {r['ttft_p50'] * 1e3:.0f} | {r['ttft_p95'] * 1e3:.0f} | {r['itl_p50'] * 1e3:.0f} |")
    print(f"load after the runs: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
