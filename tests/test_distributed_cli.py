"""`dllama-run --workers` end to end: the root CLI on a worker process gives one node's text."""
from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest
from conftest import CONFORMANCE, require_fixtures

RUN = [sys.executable, "-m", "dllama.cli.dllama_run"]


@pytest.fixture
def worker_address():
    proc = subprocess.Popen(RUN + ["worker", "--host", "127.0.0.1", "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"listening on ([\d.]+:\d+)", proc.stderr.readline())
        assert match
        yield match.group(1)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_root_cli_with_a_worker_writes_the_single_node_text(worker_address):
    folder = require_fixtures(CONFORMANCE / "tiny-llama")
    args = RUN + ["--model", str(folder / "expected_f32.m"), "--tokenizer", str(folder / "expected.t"),
                  "--prompt", "Hello world", "--steps", "12", "--temperature", "0"]
    one = subprocess.run(args, capture_output=True, text=True, timeout=120)
    two = subprocess.run(args + ["--workers", worker_address], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and len(one.stdout) > len("Hello world")


def test_root_cli_names_an_unreachable_worker_in_one_line():
    folder = require_fixtures(CONFORMANCE / "tiny-llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening, held: refused, and nobody else can take the port
        port = s.getsockname()[1]
        out = subprocess.run(RUN + ["--model", str(folder / "expected_q40.m"), "--tokenizer",
                                    str(folder / "expected.t"), "--prompt", "Hi", "--workers", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"worker 127.0.0.1:{port} (node 1)" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_chat_with_a_worker_answers_like_one_node(worker_address):
    folder = require_fixtures(CONFORMANCE / "tiny-llama")
    args = RUN + ["chat", "--model", str(folder / "expected_f32.m"), "--tokenizer", str(folder / "expected.t"),
                  "--temperature", "0", "--steps", "8", "--nthreads", "1"]
    turns = "Hello\nAnd then?\n\n"  # two turns: the second reuses the cluster's KV cache
    one = subprocess.run(args, input=turns, capture_output=True, text=True, timeout=120)
    two = subprocess.run(args + ["--workers", worker_address], input=turns, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.count(">") == 3
