"""Distributed runtime on loopback: peak RSS per node against the plan, ms/token, bytes per token.

    python benchmarks/distributed.py                                  # 1 (single-node Engine), 2, 3, 4, 8 nodes
    python benchmarks/distributed.py --nodes 2,3w,3c --steps 16       # 3w: --weights 2,1,1; 3c: --root-compute none
    python benchmarks/distributed.py --netem --nodes 2,4,8           # mesh, star, MPI on emulated Pi links (root)

Builds (once, into .bench/) a TinyLlama-1.1B-shaped q40 model with random weights written
straight in the q40 block layout, then for each node count starts the workers as
`dllama-run worker` processes on 127.0.0.1 and the root in its own process, one thread each
(NUMBA_NUM_THREADS=1); the root imports dllama-run's CLI module as `dllama-run` would (typer and
what it loads), and the KV cache holds exactly the prompt and the generated tokens, so that the
whole cache the plan counts is in use. Peak RSS is each process's VmHWM. Each node count runs --repeat times
and the fastest run is reported (the others are on stderr). Results go to stdout as a markdown
table, and the plan's prediction (`dllama-run plan`) sits beside each measurement.

--netem puts every node in its own network namespace behind an emulated Pi 5 or Pi 3B+
link (benchmarks/netem.py) and compares `--workers`' exchanges (tcp-mesh, the default; tcp-slices;
tcp-star) with MPI (`dllama-run mpi`'s engine under mpiexec, "direct" and "allgather" exchanges)
and with the reference C++ root and workers on the same .m ("reference", once per node count; it
needs as many kv heads as nodes, so beyond 4 nodes it runs the shape with 8 kv heads). Per token: the
transfer time (the same cluster with the layers replaced by a stub that returns its partial at
once, so that only the exchange is timed), the bytes all nodes put on their links (kernel
counters), the network steps on the critical path (one-way latencies: counted from the
protocol), and ms/token with the real layers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
MODEL = BENCH / "tinyllama_random_q40.m"  # --model replaces it (e.g. SmolLM2 q40: a real model, uneven splits)
TINYLLAMA = dict(dim=2048, hidden_dim=5632, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, max_seq_len=2048)
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975]
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "llama2"
TOKENIZER = BENCH / "dllama_tokenizer_llama2.t"


def single_thread_env() -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def build_model(path: Path, **shape) -> None:
    """Random q40 blocks with sane scales: what matters here is the shape, not the text."""
    from dllama.formats import Q40_BLOCK, ArchType, FloatType, ModelHeader, atomic_output, tensor_plan

    h = ModelHeader(arch=ArchType.LLAMA, weights_float_type=FloatType.Q40, rope_theta=10000, norm_epsilon_code=5,
                    **{**TINYLLAMA, **shape})
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as f:
        f.write(h.to_bytes())
        for spec in tensor_plan(h):
            if spec.float_type == FloatType.F32:
                values = rng.standard_normal(spec.shape, dtype=np.float32)
                (values * 0.02 if len(spec.shape) == 2 else 1 + 0.05 * values).astype("<f4").tofile(f)
                continue
            blocks = np.empty(spec.nbytes // Q40_BLOCK.itemsize, dtype=Q40_BLOCK)
            blocks["qs"] = rng.integers(0, 256, size=blocks["qs"].shape, dtype=np.uint8)
            blocks["d"] = (rng.random(len(blocks), dtype=np.float32) * 0.004 + 0.001).astype(np.float16)
            blocks.tofile(f)


def vm_hwm(pid: int | str = "self", field: str = "VmHWM") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(field + r":\s+(\d+) kB", text).group(1)) * 1024


def start_worker() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1",
                             "--port", "0", "--nthreads", "1"], stderr=subprocess.PIPE, text=True,
                             env=single_thread_env())
    line = proc.stderr.readline()
    m = re.search(r"listening on ([\d.]+:\d+)", line)
    if not m:
        raise SystemExit(f"worker did not start: {line}")
    return proc, m.group(1)


SHAPES = {"w": dict(weights="2,1,1"), "c": dict(root_compute="none")}  # suffixes of --nodes entries


def parse_shape(entry: str) -> tuple[int, dict]:
    """'3' -> (3, {}); '3w' -> (3, weights 2,1,1 (twice the root's share)); '3c' -> (3, coordinator root)."""
    n = int(entry.rstrip("".join(SHAPES)))
    extra = SHAPES.get(entry[-1], {}) if not entry[-1].isdigit() else {}
    if "weights" in extra:
        extra = dict(weights=",".join(["2"] + ["1"] * (n - 1)))
    return n, extra


def run_root(workers: list[str], steps: int, max_seq_len: int, buffer_type: str | None,
             extra: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--role", "root", "--steps", str(steps), "--max-seq-len", str(max_seq_len),
           "--workers", ",".join(workers), "--model", str(MODEL)]
    if buffer_type:
        cmd += ["--buffer-float-type", buffer_type]
    for key, value in (extra or {}).items():
        cmd += [f"--{key.replace('_', '-')}", value]
    out = subprocess.run(cmd, capture_output=True, text=True, env=single_thread_env())
    if out.returncode:
        raise SystemExit(f"root failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def root_role(args) -> None:
    """Inside the root process: load, prefill the prompt, decode `steps` greedy tokens, report."""
    import dllama.cli.dllama_run  # noqa: F401 (what dllama-run loads to read its arguments: typer, click, pydantic)

    t0 = time.perf_counter()
    workers = [w for w in args.workers.split(",") if w]
    if workers:
        from dllama.runtime.distributed.root import DistributedEngine, parse_workers
        engine = DistributedEngine(MODEL, parse_workers(",".join(workers)), max_seq_len=args.max_seq_len,
                                   buffer_type=args.buffer_float_type, nthreads=1, log=lambda m: None,
                                   weights=args.weights, root_compute=args.root_compute)
    else:
        from dllama.runtime.engine import Engine
        engine = Engine.load(MODEL, max_seq_len=args.max_seq_len, nthreads=1)
    startup = time.perf_counter() - t0
    phases = {"loaded": vm_hwm()}
    logits = engine.forward(PROMPT, 0)
    phases["prefill"] = vm_hwm()
    token = int(np.argmax(logits[-1]))
    traffic = getattr(engine, "traffic", None)
    sent0, recv0 = (traffic.sent, traffic.received) if traffic else (0, 0)
    t1 = time.perf_counter()
    for i in range(args.steps):
        token = int(np.argmax(engine.forward([token], len(PROMPT) + i)[-1]))
    decode = time.perf_counter() - t1
    phases["decode"] = vm_hwm()
    phases["anon"] = vm_hwm(field="RssAnon")
    phases["file"] = vm_hwm(field="RssFile")
    result = {
        "nodes": 1 + len(workers), "startup_s": startup, "ms_per_token": 1000 * decode / args.steps,
        "root_peak_rss": vm_hwm(),  # not ru_maxrss: Linux carries the parent's peak across fork + exec
        "sent_per_token": (traffic.sent - sent0) / args.steps if traffic else 0,
        "received_per_token": (traffic.received - recv0) / args.steps if traffic else 0,
        "streamed_bytes": sum(link.streamed_bytes for link in getattr(engine, "links", [])),
        "root_hwm_by_phase": phases,
    }
    if workers:
        engine.close()
    print(json.dumps(result))


def measure(shape: str, args) -> dict:
    n_nodes, extra = parse_shape(shape)
    procs = [start_worker() for _ in range(n_nodes - 1)]
    try:
        result = run_root([addr for _, addr in procs], args.steps, args.max_seq_len, args.buffer_float_type, extra)
        time.sleep(0.2)
        result["worker_peak_rss"] = [vm_hwm(p.pid) for p, _ in procs]
        result["shape"] = shape
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait()
    return result


def ensure_tokenizer() -> Path | None:
    """The Llama 2 tokenizer (TinyLlama's) as a .t, for the CLI runs; None without the fixtures."""
    if not TOKENIZER.is_file() and LLAMA2_TOKENIZER.is_dir():
        subprocess.run([sys.executable, "-m", "dllama.cli.dllama_convert", "tokenizer", str(LLAMA2_TOKENIZER), "--name",
                        "llama2", "--output-dir", str(BENCH)], check=True, stdout=subprocess.DEVNULL,
                        env=single_thread_env())
    return TOKENIZER if TOKENIZER.is_file() else None


def peak_rss_of(cmd: list[str]) -> int:
    """Run cmd to completion; its peak RSS in bytes (from wait4)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=single_thread_env())
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024


def measure_cli(tokenizer: Path, steps: int, max_seq_len: int) -> dict:
    """What a user runs: `dllama-run` (tokenizer, CLI) on one node, as the root of 2 nodes, and as a
    coordinator root (--root-compute none) of 2 workers."""
    cmd = [sys.executable, "-m", "dllama.cli.dllama_run", "--model", str(MODEL), "--tokenizer", str(tokenizer),
           "--prompt",
           "Once upon a time", "--steps", str(steps), "--nthreads", "1", "--max-seq-len", str(max_seq_len),
           "--temperature", "0"]
    single = peak_rss_of(cmd)
    workers = [start_worker() for _ in range(2)]
    try:
        root = peak_rss_of(cmd + ["--workers", workers[0][1]])
        time.sleep(0.2)
        worker = vm_hwm(workers[0][0].pid)
        coordinator = peak_rss_of(cmd + ["--workers", ",".join(a for _, a in workers), "--root-compute", "none"])
        return {"single": single, "root": root, "worker": worker, "coordinator": coordinator}
    finally:
        for proc, _ in workers:
            proc.terminate()
            proc.wait()


def planned(shape: str, max_seq_len: int) -> list[int]:
    from dllama.formats import read_model_header
    from dllama.runtime.distributed.node_memory import cluster_weights, memory_plan
    n_nodes, extra = parse_shape(shape)
    weights = cluster_weights(n_nodes, extra.get("weights"), extra.get("root_compute", "all"))
    return [m.total for m in memory_plan(read_model_header(MODEL), n_nodes, max_seq_len, batch=len(PROMPT),
                                         weights=weights)]


# --------------------------------------------------------------------------------------------
# --netem (issue 15): TCP star against MPI across emulated links

NETEM_MODES = ("tcp-mesh", "tcp-slices", "tcp-star", "mpi-direct", "mpi-allgather", "reference")  # mesh: default
REFERENCE_PROMPT = "The capital of France is Paris, and"  # the byte tokenizer: one token a character
LAYERS_PER_TOKEN = 2 * TINYLLAMA["n_layers"]  # exchange seams per token


class StubLayers:
    """model.NodeLayers with no arithmetic: each seam's partial is ready at once, so a run times only the
    exchange (what the network costs per token, apart from compute)."""

    def __init__(self, h, weights, share, max_seq_len, slots=1):
        self.dim, self.share, self.slots = h.dim, share, slots
        self.width = share.vocab[1] - share.vocab[0]

    def attention_block(self, layer, x, pos):
        return np.full_like(x, 1e-3) if self.share.computes else None

    def ffn_block(self, layer, x):
        return self.attention_block(layer, x, 0)

    def logits(self, x):
        return np.zeros((len(x), self.width), dtype=np.float32)


def use_stub_layers() -> None:
    from dllama.runtime.distributed import mpi, root, worker
    for module in (mpi, root, worker):
        module.NodeLayers = StubLayers


def network_steps(mode: str, n: int) -> int:
    """One-way network latencies on a token's critical path. TCP star: x out (1), per seam worker ->
    root -> worker (2), logits back (1). MPI direct: x out (1), per seam every rank to every rank (1),
    logits gathered (1). MPI allgather: MPICH's recursive doubling / Bruck take ceil(log2 n) steps per
    seam and its binomial broadcast as many; the gather is one."""
    log2 = max(1, (n - 1).bit_length())
    if mode in ("tcp-star", "tcp-slices"):  # slices: partial slices to their owners (1), the slices' sums back (1)
        return 2 + 2 * LAYERS_PER_TOKEN
    if mode in ("mpi-direct", "tcp-mesh", "reference"):  # every node to every node, one step per seam
        return 2 + LAYERS_PER_TOKEN  # the reference: its control packet and x go out together (1), logits (1)
    return log2 + log2 * LAYERS_PER_TOKEN + 1


def timed_decode(engine, steps: int, mark) -> dict:
    """Prefill, then `steps` greedy tokens between two marks (where the driver reads the link counters)."""
    token = int(np.argmax(engine.forward(PROMPT, 0)[-1]))
    mark()
    t0 = time.perf_counter()
    for i in range(steps):
        token = int(np.argmax(engine.forward([token], len(PROMPT) + i)[-1]))
    elapsed = time.perf_counter() - t0
    mark()
    return {"ms_per_token": 1000 * elapsed / steps}


def wait_for_driver() -> None:
    print("MARK", flush=True)
    sys.stdin.readline()


def netem_root_role(args) -> None:
    """Node 0 inside its namespace: the TCP root, or rank 0 under mpiexec (other ranks serve inside)."""
    if args.stub:
        use_stub_layers()
    if args.role == "mpi-root":
        from dllama.runtime.distributed.mpi import open_mpi_engine
        engine = open_mpi_engine(MODEL, args.max_seq_len, 1, log=lambda m: None)
    else:
        from dllama.runtime.distributed.root import DistributedEngine, parse_workers
        engine = DistributedEngine(MODEL, parse_workers(args.workers), max_seq_len=args.max_seq_len, nthreads=1,
                                   log=lambda m: None, exchange=args.exchange)
    result = timed_decode(engine, args.steps, wait_for_driver)
    engine.close()
    print(json.dumps(result), flush=True)


def netem_worker_role(args) -> None:
    if args.stub:
        use_stub_layers()
    from dllama.runtime.distributed.worker import Worker
    Worker("0.0.0.0", 9999, model_path=MODEL, nthreads=1).serve_forever()


def run_netem(net, mode: str, stub: bool, steps: int, max_seq_len: int) -> dict:
    """One cluster run in the namespaces; returns ms/token and the bytes on all links per token."""
    import tempfile

    from netem import MPI_OVER_ETH0, mpiexec_command
    env = single_thread_env()
    me = [sys.executable, __file__, "--steps", str(steps), "--max-seq-len", str(max_seq_len), "--model", str(MODEL)]
    me += ["--stub"] if stub else []
    workers = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if mode.startswith("tcp"):
                for i in range(1, net.n):
                    w = net.popen(i, me + ["--role", "netem-worker"], stderr=subprocess.PIPE, text=True, env=env)
                    w.stderr.readline()  # listening
                    workers.append(w)
                addresses = ",".join(f"{net.address(i)}:9999" for i in range(1, net.n))
                cmd = net.command(0, me + ["--role", "netem-root", "--workers", addresses, "--exchange",
                                           mode.split("-")[1]])
                env_root = env
            else:
                cmd = net.command(0, mpiexec_command(net, tmp) + me + ["--role", "mpi-root"])
                env_root = dict(env, **MPI_OVER_ETH0, DLLAMA_MPI_EXCHANGE=mode.split("-")[1])
            root = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env_root)
            counters = []
            for line in root.stdout:
                if line.startswith("MARK"):
                    counters.append(net.link_bytes())
                    root.stdin.write("go\n")
                    root.stdin.flush()
                elif line.startswith("{"):
                    result = json.loads(line)
            if root.wait() or len(counters) != 2:
                raise SystemExit(f"{mode} on {net.n} nodes failed: {root.stderr.read()[-2000:]}")
        finally:
            for w in workers:
                w.terminate()
                w.wait()
    per_node = [((t1 - t0) / steps, (r1 - r0) / steps) for (t0, r0), (t1, r1) in zip(*counters)]
    result["wire_bytes_per_token"] = sum(sent for sent, _ in per_node)
    result["busiest_link_bytes_per_token"] = max(max(pair) for pair in per_node)  # one direction of one link
    result["link_bytes_per_token"] = [[round(sent), round(received)] for sent, received in per_node]
    return result


def run_reference_netem(net, steps: int, max_seq_len: int) -> dict:
    """The reference C++ root (node 0) and workers in the namespaces, on the same .m with q80 buffers:
    the link counters are read at its first and last predicted token (it prints and flushes a line per
    token), so its weight streaming and prompt are not counted. Its layers compute (it has no stub):
    ms_per_token is its own mean over the predicted tokens but the first."""
    sys.path.insert(0, str(ROOT / "tests"))
    from reference_runtime import build_reference
    from vs_reference import byte_tokenizer

    binary, tokenizer, model = build_reference(), byte_tokenizer(BENCH), MODEL
    if net.n > TINYLLAMA["n_kv_heads"] and model == BENCH / "tinyllama_random_q40.m":
        # it refuses more nodes than kv heads; what crosses the network (x, partials, logits) does not
        # depend on them, so it runs the same shape with 8 kv heads
        model = BENCH / "tinyllama_random_q40_kv8.m"
        if not model.is_file():
            build_model(model, n_kv_heads=8)
    workers = [net.popen(i, [str(binary), "worker", "--port", "9999", "--nthreads", "1"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL) for i in range(1, net.n)]
    try:
        cmd = [str(binary), "inference", "--model", str(model), "--tokenizer", str(tokenizer), "--prompt",
               REFERENCE_PROMPT, "--steps", str(len(REFERENCE_PROMPT) + 2 + steps), "--nthreads", "1",
               "--buffer-float-type", "q80", "--temperature", "0", "--seed", "1", "--max-seq-len",
               str(max(max_seq_len, len(REFERENCE_PROMPT) + 2 + steps)),
               "--workers", *(f"{net.address(i)}:9999" for i in range(1, net.n))]
        root = net.popen(0, cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        counters, times, tail = [], [], []
        for raw in root.stdout:
            line = raw.decode("utf-8", "replace")
            tail = (tail + [line])[-20:]
            if line.startswith("🔶 Pred"):
                counters = [counters[0] if counters else net.link_bytes(), net.link_bytes()]
                times.append(float(re.search(r"Pred\s*(\d+) ms", line).group(1)))
        if root.wait() or len(times) < 3:
            raise SystemExit(f"the reference on {net.n} nodes failed: {''.join(tail)}")
    finally:
        for w in workers:
            w.terminate()
            w.wait()
    tokens = len(times) - 1
    per_node = [((t1 - t0) / tokens, (r1 - r0) / tokens) for (t0, r0), (t1, r1) in zip(*counters)]
    return {"ms_per_token": sum(times[1:]) / tokens, "wire_bytes_per_token": sum(sent for sent, _ in per_node),
            "busiest_link_bytes_per_token": max(max(pair) for pair in per_node),
            "link_bytes_per_token": [[round(sent), round(received)] for sent, received in per_node]}


def netem_table(args) -> None:
    """Per token: bytes on all links and on the busiest link (measured), one-way steps (counted), and
    the transfer time those give on the profile's link: steps x (delay + the stack's measured cost of
    one step) + busiest link bytes / rate. Beside it the wall time of the stub run here, where n
    single-thread nodes share 2 cores, and ms/token with the real layers."""
    import tempfile

    from netem import PROFILES, NetemCluster, mpi_step_us, ping_pong_us
    rows = []
    with NetemCluster(2, PROFILES["none"]) as net, tempfile.TemporaryDirectory() as tmp:
        stack_us = {"tcp": ping_pong_us(net) / 2, "mpi": mpi_step_us(net, launcher_dir=tmp)}
    print(f"one step between two namespaces, no shaping: TCP {stack_us['tcp']:.0f} us (half a 2.2 kB round trip), "
          f"MPI {stack_us['mpi']:.0f} us (2.2 kB each way)", file=sys.stderr)
    reference: dict[int, dict] = {}  # by node count: its bytes do not depend on the profile
    for key in args.profiles.split(","):
        profile = PROFILES[key]
        for shape in args.nodes.split(","):
            n = int(shape)
            for mode in args.modes.split(","):
                if mode == "reference":
                    if n not in reference:  # measured once, under the first profile's shaping
                        with NetemCluster(n, profile) as net:
                            reference[n] = run_reference_netem(net, args.steps, args.max_seq_len)
                    stub, full = dict(reference[n], ms_per_token=None), reference[n]  # it has no stub
                else:
                    with NetemCluster(n, profile) as net:
                        stub = run_netem(net, mode, True, args.steps, args.max_seq_len)
                        full = run_netem(net, mode, False, args.steps, args.max_seq_len) if args.compute else None
                stack = stack_us["mpi" if mode.startswith("mpi") else "tcp"]
                step_ms = (profile.delay_ms if not net.emulates_delay else 0) + stack / 1000
                busiest = stub["busiest_link_bytes_per_token"]
                row = {"profile": key, "nodes": n, "mode": mode, "bytes": stub["wire_bytes_per_token"],
                       "busiest": busiest, "steps": network_steps(mode, n),
                       "wall_ms": stub["ms_per_token"], "ms_per_token": full["ms_per_token"] if full else None,
                       "delay_emulated": net.emulates_delay, "stack_us": stack,
                       "links": stub["link_bytes_per_token"]}
                row["transfer_ms"] = row["steps"] * step_ms + busiest * 8 / (profile.rate_mbit * 1000)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    theirs = {(r["profile"], r["nodes"]): r["transfer_ms"] for r in rows if r["mode"] == "reference"}
    print("| profile | nodes | exchange | bytes/token, all links | busiest link | one-way steps | transfer ms/token "
          "| / reference's | stub wall ms/token here | ms/token with compute here |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        full, wall = (f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("ms_per_token", "wall_ms"))
        ratio = theirs.get((r["profile"], r["nodes"]))
        ratio = f"{r['transfer_ms'] / ratio:.2f}" if ratio else "-"
        print(f"| {r['profile']} | {r['nodes']} | {r['mode']} | {r['bytes'] / 1000:.0f} kB | "
              f"{r['busiest'] / 1000:.0f} kB | {r['steps']} | {r['transfer_ms']:.1f} | {ratio} | {wall} | {full} |")


def exchange_cpu(n_nodes: int, seams: int = 300) -> None:
    """CPU of one decode seam's exchange, mesh against slices (q80, TinyLlama's dim): n_nodes threads in
    this process joined by socketpairs, each running the exchange function its node runs; every
    node's thread CPU time (its syscalls included, and on loopback the kernel's delivery to the peer)
    summed, per seam. Paired, alternating, twice."""
    import socket
    import threading

    from dllama.runtime.distributed.exchange import (
        decode_partial,
        encode_partial,
        mesh_partials,
        slices_sum,
        sum_partials,
    )
    from dllama.runtime.distributed.protocol import PARTIAL_HEAD, BufferType, Channel

    dim, bt = TINYLLAMA["dim"], BufferType.Q80
    computing = list(range(n_nodes))
    partials = [np.random.default_rng(i).standard_normal((1, dim)).astype(np.float32) for i in computing]

    def mesh(i: int, peers: dict, layer: int, seam: int) -> None:
        own = encode_partial(partials[i], bt)
        got = mesh_partials(i, own, peers, computing, layer, seam, PARTIAL_HEAD.size + len(own))
        sum_partials([decode_partial(got[j], 1, dim, bt) for j in computing])

    def slices(i: int, peers: dict, layer: int, seam: int) -> None:
        slices_sum(i, partials[i], peers, computing, layer, seam, 1, dim, bt)

    def run(exchange) -> float:
        links: list[dict] = [{} for _ in computing]
        for a in computing:
            for b in range(a + 1, n_nodes):
                sa, sb = socket.socketpair()
                links[a][b], links[b][a] = Channel(sa), Channel(sb)
        cpu = [0.0] * n_nodes

        def node(i: int) -> None:
            t0 = time.thread_time()
            for k in range(seams):
                exchange(i, links[i], k // 2, k % 2)
            cpu[i] = time.thread_time() - t0

        threads = [threading.Thread(target=node, args=(i,)) for i in computing]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return 1e6 * sum(cpu) / seams

    for _ in range(2):
        m, sl = run(mesh), run(slices)
        print(f"{n_nodes} nodes, CPU per seam of all nodes: mesh {m:.0f} us, slices {sl:.0f} us ({sl / m:.2f}x)")


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", default="driver", choices=["driver", "root", "netem-root", "netem-worker", "mpi-root"])
    p.add_argument("--netem", action="store_true", help="TCP star vs MPI in network namespaces (needs root)")
    p.add_argument("--profiles", default="pi5,pi3", help="--netem: link profiles (benchmarks/netem.py)")
    p.add_argument("--modes", default=",".join(NETEM_MODES), help="--netem: exchanges to compare")
    p.add_argument("--no-compute", dest="compute", action="store_false",
                   help="--netem: time the exchange only (skip the runs with the real layers)")
    p.add_argument("--exchange-cpu", type=int, metavar="N", help="CPU of one seam's exchange, mesh against slices, "
                                                                 "on N in-process nodes (no namespaces)")
    p.add_argument("--stub", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--exchange", default="mesh", help=argparse.SUPPRESS)  # the netem root's --exchange
    p.add_argument("--nodes", default="1,2,3,4,8,3w,3c",
                   help="shapes to measure: a node count (1 is the single-node Engine), with w: --weights 2,1,..; "
                        "with c: --root-compute none")
    p.add_argument("--steps", type=int, default=24, help="generated tokens timed per run")
    p.add_argument("--repeat", type=int, default=3, help="runs per node count; the fastest is reported")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV cache positions (default: the prompt and the generated tokens, so that the whole cache "
                        "the plan counts is used)")
    p.add_argument("--buffer-float-type", default=None)
    p.add_argument("--workers", default="")
    p.add_argument("--weights", default=None)
    p.add_argument("--root-compute", default="all")
    p.add_argument("--model", default=None, help="measure this .m instead of the TinyLlama-shaped random model "
                                                 "(the CLI runs, which need its tokenizer, are skipped)")
    args = p.parse_args()
    args.max_seq_len = args.max_seq_len or len(PROMPT) + args.steps
    global MODEL
    if args.model:
        MODEL = Path(args.model)
    if args.role == "root":
        return root_role(args)
    if args.role in ("netem-root", "mpi-root"):
        return netem_root_role(args)
    if args.role == "netem-worker":
        return netem_worker_role(args)
    if args.exchange_cpu:
        return exchange_cpu(args.exchange_cpu)
    if not MODEL.exists():
        print(f"building {MODEL} ...", file=sys.stderr)
        build_model(MODEL)
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} cores; model "
          f"{MODEL.stat().st_size / 1e6:.0f} MB",
          file=sys.stderr)
    # compile (or load) the kernels into numba's cache first, so no measured process pays for LLVM
    run_root([], 2, args.max_seq_len, None)
    if args.netem:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        return netem_table(args)
    rows = []
    for shape in args.nodes.split(","):
        runs = [measure(shape, args) for _ in range(args.repeat)]
        for r in runs:
            print(json.dumps(r), file=sys.stderr)
        r = min(runs, key=lambda r: r["ms_per_token"])  # the least disturbed by other load
        r["plan"] = planned(shape, args.max_seq_len)
        rows.append(r)
    print("| shape | ms/token | root sent/token | root received/token | peak RSS per node, root first (plan) | "
          "worst vs plan | start-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        measured = [r["root_peak_rss"]] + r["worker_peak_rss"]
        per_node = ", ".join(f"{mb(m)} ({mb(p)})" for m, p in zip(measured, r["plan"]))
        worst = max((m - p) / p for m, p in zip(measured, r["plan"]))
        worst_low = min((m - p) / p for m, p in zip(measured, r["plan"]))
        deviation = worst if abs(worst) >= abs(worst_low) else worst_low
        print(f"| {r['shape']} | {r['ms_per_token']:.1f} | {r['sent_per_token'] / 1000:.1f} kB | "
              f"{r['received_per_token'] / 1000:.1f} kB | {per_node} | {100 * deviation:+.1f}% | {r['startup_s']:.1f} "
              "s |")
    tokenizer = ensure_tokenizer() if not args.model else None
    if tokenizer is None:
        print("\n(the CLI runs are skipped: " + ("--model given)" if args.model else f"no {LLAMA2_TOKENIZER})"))
        return
    c = measure_cli(tokenizer, args.steps, args.max_seq_len)
    print("\nThrough the CLI (`dllama-run`, which also loads the tokenizer): 2 nodes, and a coordinator root of 2 "
          "workers:\n")
    print("| one node peak RSS | root peak RSS | worker peak RSS | coordinator root peak RSS |\n|---|---|---|---|")
    print(f"| {mb(c['single'])} | {mb(c['root'])} = {100 * c['root'] / c['single']:.1f}% of 1 node | {mb(c['worker'])} "
          "| "
          f"{mb(c['coordinator'])} |")


if __name__ == "__main__":
    main()
