"""Helpers for the API server tests: a real `dllama-run serve` process on loopback, an in-process
uvicorn server, and local generation with the same engine to compare against."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from dllama.runtime.generate import generate
from dllama.runtime.sampler import Sampler, Sampling

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120  # first start compiles (or loads cached) numba kernels


def load_engine_and_tokenizer(model: Path, tokenizer: Path, max_seq_len: int):
    from dllama.runtime.engine import Engine
    from dllama.tokenizer import Tokenizer

    return Engine.load(str(model), max_seq_len=max_seq_len), Tokenizer.load(str(tokenizer))


def free_port() -> int:
    """A port nobody listened on a moment ago, for programs that cannot take port 0 (the reference C++ worker):
    another process may take it before they bind, so their start must be retried (reference_worker)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


SERVING = re.compile(r"serving .* on http://[^ ]+:(\d+)/v1")


class LogWatcher:
    """Drains a process's stderr lines in a thread (so that they never fill the pipe) and keeps them; `port()`
    waits for the server's "serving ... on http://HOST:PORT/v1" line, as `--port 0` logs the OS's port."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._port: int | None = None
        self._found = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            self.lines.append(line)
            if self._port is None and (match := SERVING.search(line)):
                self._port = int(match.group(1))
                self._found.set()
        self._found.set()  # the process ended (with or without the line)

    def port(self, timeout: float = START_TIMEOUT_S) -> int:
        if not self._found.wait(timeout) or self._port is None:
            raise RuntimeError(f"no 'serving ... on' line from the server: {self.text()[-3000:]}")
        return self._port

    def text(self, timeout: float = 5) -> str:
        return "".join(self.lines)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def wait_for_health(url: str, proc=None, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = proc.stderr_text() if hasattr(proc, "stderr_text") else proc.stderr.read().decode(errors="replace")
            raise RuntimeError(f"the server exited with {proc.returncode}: {log}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code in (200, 503):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no answer from {url}/health after {timeout} s")


class ServerProcess:
    """`dllama-run serve ...` as a subprocess on loopback, on the port the OS gives it (--port 0)."""

    def __init__(self, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(["dllama-run", "serve", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.log = LogWatcher(self.proc.stderr)
        try:
            self.port = self.log.port()
            self.url = f"http://{LOOPBACK}:{self.port}"
            wait_for_health(self.url, self)
        except BaseException:
            self.stop()
            raise

    def poll(self):
        return self.proc.poll()

    @property
    def returncode(self):
        return self.proc.returncode

    def stderr_text(self) -> str:
        if self.proc.poll() is not None:
            self.log.join(5)
        return self.log.text()

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """The server's resident memory; field RssAnon or RssFile splits it into heap and mapped files."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def in_process_server(app):
    """The app on uvicorn in a thread of this process: real sockets, and the engine within reach. Its socket
    is bound (port 0) and listening before the thread starts: no port race, no refused first request."""
    import uvicorn

    from dllama.runtime.serve.connections import uvicorn_config

    config = uvicorn_config(app, LOOPBACK, 0)
    sock = config.bind_socket()
    sock.listen(socket.SOMAXCONN)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
    try:
        wait_for_health(url, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def start_worker(port: int = 0, attempts: int = 50) -> tuple[subprocess.Popen, int]:
    """`dllama-run worker` on loopback (port 0: one the OS picks); its port is also proc.port. A given port
    (a worker restarted where one was killed) can be busy for a moment, e.g. as the local end of the root's
    own reconnection attempt to it: the start is retried, a bounded number of times."""
    for _ in range(attempts):
        proc = subprocess.Popen(["dllama-run", "worker", "--host", LOOPBACK, "--port", str(port), "--nthreads", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()  # "worker listening on 127.0.0.1:PORT"
        if "listening on" in line:
            break
        proc.kill()
        proc.wait()
        if port == 0 or "cannot listen" not in line:
            raise RuntimeError(f"the worker did not start: {line}")
        time.sleep(0.05)  # bounded retries, not an ordering: the port frees itself
    else:
        raise RuntimeError(f"port {port} stayed busy for {attempts} worker starts")
    # keep draining its log so it never blocks on a full pipe
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    proc.port = int(line.rsplit(":", 1)[1])
    return proc, proc.port


def complete(url: str, prompt: str, max_tokens: int, results: dict, key) -> None:
    """A greedy /v1/completions request; its response goes to results[key] (for threads)."""
    results[key] = httpx.post(f"{url}/v1/completions", timeout=120,
                              json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def side_by_side(url: str, prompts, limits) -> dict:
    """The prompts as concurrent requests, one thread each: {index: response}."""
    results: dict = {}
    threads = [threading.Thread(target=complete, args=(url, p, n, results, i))
               for i, (p, n) in enumerate(zip(prompts, limits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@contextmanager
def served_cluster(model_dir: Path, tokenizer: Path, context: int, *options: str):
    """`dllama-run serve` (f32 buffers) in front of a root and one `dllama-run worker` process on loopback, the
    model's tokenizer converted with its HF tokenizer embedded into `tokenizer`: yields (server, worker)."""
    from dllama.tokenizer.from_hf import convert_tokenizer

    tokenizer.write_bytes(convert_tokenizer(model_dir).to_bytes())
    worker, port = start_worker()
    server = None
    try:
        server = ServerProcess("--model", str(model_dir / "expected_f32.m"), "--tokenizer", str(tokenizer),
                               "--max-seq-len", str(context), "--workers", f"{LOOPBACK}:{port}",
                               "--buffer-float-type", "f32", *options)
        yield server, worker
    finally:
        if server is not None:
            server.stop()
        if worker.poll() is None:
            worker.kill()
        worker.wait()


class RecordingEngine:
    """Wraps an engine: records each forward(ids, pos) call."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[tuple[int, list[int]]] = []  # (pos, token ids)

    def forward(self, token_ids, pos: int, last_only: bool = False):
        self.calls.append((pos, [int(t) for t in token_ids]))
        return self.engine.forward(token_ids, pos, last_only)

    def cache_contents(self) -> list[int]:
        """The token ids the engine's KV cache holds after the recorded calls."""
        cache: list[int] = []
        for pos, ids in self.calls:
            cache[pos:] = ids
        return cache


class GatedEngine(RecordingEngine):
    """A recording engine whose every forward waits for a permit from the test (release(n), or open() for
    all): the test, not a clock, says how far the server's generation may get."""

    def __init__(self, engine):
        super().__init__(engine)
        self._cond = threading.Condition()
        self._permits = 0
        self._open = False
        self.at_gate = 0  # forwards waiting for a permit now

    def forward(self, token_ids, pos: int, last_only: bool = False):
        with self._cond:
            self.calls.append((pos, [int(t) for t in token_ids]))
            self.at_gate += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._open or self._permits > 0)
            self.at_gate -= 1
            if not self._open:
                self._permits -= 1
        return self.engine.forward(token_ids, pos, last_only)

    def release(self, n: int = 1) -> None:
        with self._cond:
            self._permits += n
            self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def wait_for_calls(self, n: int, timeout: float = 30) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.calls) >= n, timeout), f"fewer than {n} forwards"


def drain_until_idle(url: str, gate: GatedEngine, most: int, timeout: float = 60) -> int:
    """Lets the engine through one forward at a time while /health says busy; returns how many it took. Each
    permit follows a /health round trip on the server's event loop, which therefore has seen whatever
    happened before (a client's disconnect) by the time the next forward may run."""
    released, deadline = 0, time.monotonic() + timeout
    while httpx.get(f"{url}/health").json()["busy"]:
        assert time.monotonic() < deadline, f"still busy after {timeout} s"
        if gate.at_gate:
            assert released < most, f"the engine ran {most} forwards and was still busy"
            gate.release(1)
            released += 1
    return released


def local_generation(engine, tokenizer, prompt_ids: list[int], max_tokens: int, sampling: Sampling) -> list[int]:
    """The tokens the server should produce: the runtime's generate() from position 0 (eos not included)."""
    engine.reset()
    return list(generate(engine, prompt_ids, max_tokens, eos_ids=tokenizer.eos_ids, sampler=Sampler(sampling)))


def common_prefix(a, b) -> int:
    """Leading tokens two id lists share (the tests' own count, independent of the server's)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class HealthWatch:
    """Asks /health again and again from a thread; each answer must come within the bound, a hang detector
    (10 s: a loaded 2-core box can pause any process for a second; the latency itself is printed, a
    measurement, and test_tokenizing_runs_off_the_event_loop shows by a gate that the loop stays free)."""

    def __init__(self, url: str, bound_s: float = 10.0):
        self.url, self.bound_s = url, bound_s
        self.answers = 0
        self.slowest = 0.0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.bound_s) as client:
            while not self.stop.is_set():
                try:
                    start = time.perf_counter()
                    assert client.get(f"{self.url}/health").status_code == 200
                    self.slowest = max(self.slowest, time.perf_counter() - start)
                    self.answers += 1
                except (httpx.HTTPError, AssertionError) as e:
                    self.failures.append(repr(e))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
