"""Helpers for the API server tests: a real `dllama-run serve` process on loopback, an in-process
uvicorn server, and local generation with the same engine to compare against."""
from __future__ import annotations

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
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


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
    """`dllama-run serve ...` as a subprocess on a free loopback port."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc = subprocess.Popen(["dllama-run", "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.log: list[str] = []   # its stderr, drained so that the log lines never fill the pipe
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        try:
            wait_for_health(self.url, self)
        except BaseException:
            self.stop()
            raise

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace"))

    def poll(self):
        return self.proc.poll()

    @property
    def returncode(self):
        return self.proc.returncode

    def stderr_text(self) -> str:
        self._drain.join(5)
        return "".join(self.log)

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
    """The app on uvicorn in a thread of this process: real sockets, and the engine within reach."""
    import uvicorn

    from dllama.runtime.serve.connections import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, LOOPBACK, port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_for_health(url, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def start_worker(port: int = 0) -> tuple[subprocess.Popen, int]:
    """`dllama-run worker` on loopback (port 0: one the OS picks); its port is also proc.port."""
    proc = subprocess.Popen(["dllama-run", "worker", "--host", LOOPBACK, "--port", str(port), "--nthreads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # "worker listening on 127.0.0.1:PORT"
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"the worker did not start: {line}")
    # keep draining its log so it never blocks on a full pipe
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    proc.port = int(line.rsplit(":", 1)[1])
    return proc, proc.port


class RecordingEngine:
    """Wraps an engine: records each forward(ids, pos) call, optionally slowed like a small board."""

    def __init__(self, engine, delay_s: float = 0.0):
        self.engine = engine
        self.delay_s = delay_s
        self.calls: list[tuple[int, list[int]]] = []  # (pos, token ids)

    def forward(self, token_ids, pos: int, last_only: bool = False):
        self.calls.append((pos, [int(t) for t in token_ids]))
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.engine.forward(token_ids, pos, last_only)

    def cache_contents(self) -> list[int]:
        """The token ids the engine's KV cache holds after the recorded calls."""
        cache: list[int] = []
        for pos, ids in self.calls:
            cache[pos:] = ids
        return cache


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
