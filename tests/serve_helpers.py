"""Helpers for the API server tests: a real `dllama-run serve` process on loopback, an in-process
uvicorn server, and local generation with the same engine to compare against."""
from __future__ import annotations

import importlib.util
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from dllama.runtime.serve.protocol import Sampling
from dllama.runtime.serve.session import sample_token

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120  # first start compiles (or loads cached) numba kernels


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read().decode(errors='replace')}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code in (200, 503):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no answer from {url}/health after {timeout} s")


def dllama_run() -> list[str]:
    """`dllama-run`, or the serve CLI module alone while the runtime CLI is absent."""
    exe = shutil.which("dllama-run")
    if exe and importlib.util.find_spec("dllama.runtime.cli") is not None:
        return [exe]
    return [sys.executable, "-m", "dllama.runtime.serve.cli"]


class ServerProcess:
    """`dllama-run serve ...` as a subprocess on a free loopback port."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc = subprocess.Popen([*dllama_run(), "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for_health(self.url, self.proc)
        except BaseException:
            self.stop()
            raise

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

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

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_for_health(url, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


class RecordingEngine:
    """Wraps an engine: records each forward(ids, pos) call, optionally slowed like a small board."""

    def __init__(self, engine, delay_s: float = 0.0):
        self.engine = engine
        self.delay_s = delay_s
        self.calls: list[tuple[int, int]] = []  # (pos, number of tokens)

    def forward(self, token_ids, pos: int):
        self.calls.append((pos, len(token_ids)))
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.engine.forward(token_ids, pos)

    @property
    def evaluated(self) -> int:
        return sum(n for _, n in self.calls)


def local_generation(engine, tokenizer, prompt_ids: list[int], max_tokens: int, sampling: Sampling) -> list[int]:
    """The tokens the server should produce: a fresh run from position 0, eos included if reached."""
    rng = np.random.default_rng(sampling.seed)
    logits = engine.forward(prompt_ids, 0)[-1]
    out: list[int] = []
    while len(out) < max_tokens:
        token = sample_token(logits, sampling, rng)
        out.append(token)
        if tokenizer.is_eos(token) or len(out) == max_tokens:
            break
        logits = engine.forward([token], len(prompt_ids) + len(out) - 1)[-1]
    return out


