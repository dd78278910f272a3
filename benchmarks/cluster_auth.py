"""What the cluster key costs (issue 28): ms/token of a 2-node loopback cluster with and without it.

    flock /tmp/dllama-bench.lock python benchmarks/cluster_auth.py --rounds 8 --steps 24

The TinyLlama-1.1B-shaped q40 model of benchmarks/distributed.py (built once into .bench/), two
`dllama-run worker` processes on 127.0.0.1 (one thread each), one started with a cluster key
(DLLAMA_CLUSTER_KEY) and one without, and two roots in this process (one thread): keyed and keyless
decode greedy tokens one at a time in turn (--steps per round, --rounds rounds), so that every keyed
token has a keyless one beside it under the same load. Prints, per round, wall and root-CPU ms per
token of each and their ratios, the medians, and each root's start-up (connect, challenge-response,
HELLO, local load) as a markdown table.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed import MODEL, PROMPT, build_model, single_thread_env  # noqa: E402

KEY = "benchmark-cluster-key-0123456789abcdef"


def start_worker(key: str | None) -> tuple[subprocess.Popen, tuple[str, int]]:
    env = single_thread_env()
    env.pop("DLLAMA_CLUSTER_KEY", None)
    if key:
        env["DLLAMA_CLUSTER_KEY"] = key
    proc = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1",
                             "--port", "0", "--nthreads", "1", "--model", str(MODEL)],
                            stderr=subprocess.PIPE, text=True, env=env)
    m = re.search(r"listening on ([\d.]+):(\d+)", proc.stderr.readline())
    if not m:
        raise SystemExit("worker did not start")
    return proc, (m.group(1), int(m.group(2)))


def interleaved_decode(engines: dict, steps: int) -> dict[str, tuple[float, float]]:
    """Greedy decode on every engine, one token each in turn (the order alternating), so that each
    token of one has a token of the other beside it under the same load. (wall ms, root CPU ms) per token."""
    tokens = {}
    for label, engine in engines.items():
        engine.reset()
        tokens[label] = int(np.argmax(engine.forward(PROMPT, 0)[-1]))
    wall = dict.fromkeys(engines, 0.0)
    cpu = dict.fromkeys(engines, 0.0)
    labels = list(engines)
    for i in range(steps):
        for label in (labels if i % 2 == 0 else labels[::-1]):
            w0, c0 = time.perf_counter(), time.process_time()
            tokens[label] = int(np.argmax(engines[label].forward([tokens[label]], len(PROMPT) + i)[-1]))
            wall[label] += time.perf_counter() - w0
            cpu[label] += time.process_time() - c0
    return {label: (1000 * wall[label] / steps, 1000 * cpu[label] / steps) for label in engines}


def one_tokens_frames_ms(mac: bool, tokens: int = 20) -> float:
    """CPU ms per token of sending and receiving exactly one decode token's frames of this 2-node cluster
    (both directions, so root and worker side together) over a socketpair, with or without the MAC."""
    import socket

    from dllama.runtime.distributed.auth import frame_macs
    from dllama.runtime.distributed.protocol import Channel, Frame

    h = dict(dim=2048, layers=22, vocab=32000)
    partial = bytes(4 + h["dim"] // 32 * 34)
    frames = ([(Frame.FORWARD, bytes(8 + 4 * h["dim"]))] + [(Frame.PARTIAL, partial)] * (2 * h["layers"])
              + [(Frame.PARTIAL, partial)] * (2 * h["layers"]) + [(Frame.LOGITS, bytes(1 + h["vocab"]))])
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sender, receiver = Channel(a), Channel(b)
    if mac:
        one_way, other_way = frame_macs(KEY.encode(), bytes(32), bytes(32))
        sender.authenticate(send_mac=one_way, recv_mac=other_way)
        one_way, other_way = frame_macs(KEY.encode(), bytes(32), bytes(32))
        receiver.authenticate(send_mac=other_way, recv_mac=one_way)
    started = time.process_time()
    for _ in range(tokens):
        for kind, payload in frames:
            sender.send_frame(kind, payload)
            receiver.recv_frame(1 << 20)
    a.close(), b.close()
    return 1000 * (time.process_time() - started) / tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--control", action="store_true", help="both workers and roots keyless: the noise of the pairing")
    args = p.parse_args()
    for name, value in single_thread_env().items():
        if name.endswith("_NUM_THREADS"):
            os.environ[name] = value
    frame_pairs = [(one_tokens_frames_ms(True), one_tokens_frames_ms(False)) for _ in range(args.rounds)]
    if not MODEL.is_file():
        build_model(MODEL)
    from dllama.runtime.distributed.root import DistributedEngine

    key = None if args.control else KEY
    keyed_proc, keyed_addr = start_worker(key)
    plain_proc, plain_addr = start_worker(None)
    try:
        pairs, starts = [], {"keyed": [], "plain": []}
        for r in range(args.rounds):
            # a fresh pair of roots each round, created in alternating order: the first engine a process
            # creates ran a few percent slower in an all-keyless control run, whichever it was
            order = [("keyed", keyed_addr, key), ("plain", plain_addr, None)]
            engines = {}
            for label, addr, k in (order if r % 2 == 0 else order[::-1]):
                started = time.perf_counter()
                engines[label] = DistributedEngine(MODEL, [addr], max_seq_len=128, nthreads=1, log=lambda m: None,
                                                   cluster_key=k and k.encode())
                starts[label].append(time.perf_counter() - started)
            interleaved_decode(engines, 2)  # warm both
            got = interleaved_decode(engines, args.steps)
            for engine in engines.values():
                engine.close()
            pairs.append((got["keyed"], got["plain"]))
            print(f"round {r}: keyed {got['keyed']}, keyless {got['plain']} (wall, root CPU ms/token)",
                  file=sys.stderr)
    finally:
        for proc in (keyed_proc, plain_proc):
            proc.terminate()
            proc.wait()
    print("| | keyed: wall / root CPU ms per token | keyless: wall / root CPU | keyed / keyless: wall / CPU |")
    print("|---|---|---|---|")
    for i, ((kw, kc), (pw, pc)) in enumerate(pairs):
        print(f"| round {i} | {kw:.2f} / {kc:.2f} | {pw:.2f} / {pc:.2f} | {kw / pw:.3f} / {kc / pc:.3f} |")
    med = statistics.median
    print(f"| median of {len(pairs)} rounds | {med(k[0] for k, _ in pairs):.2f} / {med(k[1] for k, _ in pairs):.2f} | "
          f"{med(p_[0] for _, p_ in pairs):.2f} / {med(p_[1] for _, p_ in pairs):.2f} | "
          f"**{med(k[0] / p_[0] for k, p_ in pairs):.3f}** / **{med(k[1] / p_[1] for k, p_ in pairs):.3f}** |")
    added = med(k - p_ for k, p_ in frame_pairs)
    print(f"| one token's 90 frames, sent and received (both sides' work), CPU | "
          f"{med(k for k, _ in frame_pairs):.3f} ms | {med(p_ for _, p_ in frame_pairs):.3f} ms | "
          f"+{added:.3f} ms = **{100 * added / med(p_[0] for _, p_ in pairs):.2f}%** of a keyless token |")
    print(f"| start-up, median (connect, handshake, HELLO, local load) | {med(starts['keyed']) * 1000:.0f} ms | "
          f"{med(starts['plain']) * 1000:.0f} ms | {med(starts['keyed']) / med(starts['plain']):.3f} |")

if __name__ == "__main__":
    main()
