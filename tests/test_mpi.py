"""`dllama-run mpi` under mpiexec on loopback (issue 15): the TCP mode's bits at 2, 3, 4 (and 5) ranks,
one node's f32 logits, serve answering the openai client, a killed rank named, a bad model refused."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import CONFORMANCE, require_fixtures
from distributed_helpers import F32_CLUSTER_TOLERANCE, loopback_workers, write_random_model
from serve_helpers import LOOPBACK, LogWatcher, load_engine_and_tokenizer, local_generation, wait_for_health

from dllama.formats import FloatType
from dllama.runtime.distributed.root import DistributedEngine
from dllama.runtime.engine import Engine
from dllama.runtime.sampler import Sampling

DRIVER = Path(__file__).with_name("mpi_driver.py")
IDS = [1, 17, 42, 99, 3, 250, 7]
STEPS = 4


def mpiexec_command(n: int) -> list[str]:
    """mpiexec from the `mpich` wheel beside this Python (the test extras install it), or on PATH."""
    here = Path(sys.executable).with_name("mpiexec")
    exe = str(here) if here.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        reason = 'mpi4py or mpiexec is missing: pip install ".[test]" (it brings mpi4py and mpich)'
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI must provide it)", pytrace=False)
        pytest.skip(reason)
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    extra = ["--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version or "OpenRTE" in version else []
    return [exe, *extra, "-n", str(n)]


def env() -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), NUMBA_NUM_THREADS="1")


def run_driver(n: int, model: Path, out: Path, *extra: str, algorithm: str = "direct") -> dict:
    proc = subprocess.run([*mpiexec_command(n), sys.executable, str(DRIVER), str(model), str(out),
                           "--ids", ",".join(map(str, IDS)), "--steps", str(STEPS), *extra],
                          capture_output=True, text=True, timeout=180, env=dict(env(), DLLAMA_MPI_EXCHANGE=algorithm))
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    return dict(np.load(out))


def tcp_run(model: Path, n: int, **kw) -> tuple[np.ndarray, list[int]]:
    """The TCP mode's logits and greedy tokens for the driver's prompt and steps."""
    with loopback_workers(n - 1) as workers:
        engine = DistributedEngine(model, [w.address for w in workers], max_seq_len=64, log=lambda msg: None, **kw)
        try:
            logits = [engine.forward(IDS, 0)]
            tokens = [int(np.argmax(logits[-1][-1]))]
            for i in range(STEPS - 1):
                logits.append(engine.forward([tokens[-1]], len(IDS) + i))
                tokens.append(int(np.argmax(logits[-1][-1])))
        finally:
            engine.close()
    return np.concatenate(logits), tokens


@pytest.fixture(scope="module")
def h12(tmp_path_factory):
    """12 heads, 4 kv heads: 2, 3, 4 and 5 ranks, even and uneven splits."""
    folder = tmp_path_factory.mktemp("mpi_h12")
    return {ft: write_random_model(folder / f"h12_{ft.name}.m", ft, n_heads=12, n_kv_heads=4, head_dim=32,
                                   hidden_dim=384) for ft in (FloatType.F32, FloatType.Q40)}


@pytest.mark.parametrize("n", [2, 3])
def test_greedy_answers_are_the_same_beside_others_under_mpi(h12, tmp_path, n):
    """serve --parallel under mpiexec: every token's slot and position go with the command, and each
    sequence's answer is the one it gets alone (6 prompts over 4 slots, f32 buffers)."""
    got = run_driver(n, h12[FloatType.Q40], tmp_path / "slots.npz", "--slots", "4", "--buffer-float-type", "f32")
    assert list(got["alone"]) == list(got["beside"]) and len(got["alone"]) > 20
    assert int(got["most"]) == 4  # the slots shared steps


@pytest.mark.parametrize("n", [2, 3, 4])
def test_f32_logits_equal_one_node(h12, tmp_path, n):
    got = run_driver(n, h12[FloatType.F32], tmp_path / "out.npz", "--buffer-float-type", "f32")
    one = Engine.load(h12[FloatType.F32], max_seq_len=64)
    assert np.abs(got["logits"][:len(IDS)] - one.forward(IDS, 0)).max() <= F32_CLUSTER_TOLERANCE


@pytest.mark.parametrize("n, algorithm", [(2, "direct"), (3, "direct"), (4, "direct"), (3, "allgather"),
                                          (5, "direct")])  # 5: the TCP root sends SUM frames instead of partials
def test_q40_gives_the_tcp_modes_bits(h12, tmp_path, n, algorithm):
    got = run_driver(n, h12[FloatType.Q40], tmp_path / "out.npz", algorithm=algorithm)
    logits, tokens = tcp_run(h12[FloatType.Q40], n)
    assert list(got["tokens"]) == tokens
    assert np.array_equal(got["logits"], logits)


def test_coordinator_root_and_weights_give_the_tcp_modes_bits(h12, tmp_path):
    got = run_driver(3, h12[FloatType.Q40], tmp_path / "c.npz", "--root-compute", "none")
    assert np.array_equal(got["logits"], tcp_run(h12[FloatType.Q40], 3, root_compute="none")[0])
    got = run_driver(3, h12[FloatType.Q40], tmp_path / "w.npz", "--weights", "2,1,1")
    assert np.array_equal(got["logits"], tcp_run(h12[FloatType.Q40], 3, weights="2,1,1")[0])


def test_auto_weights_split_by_each_ranks_memory_and_speed(h12, tmp_path):
    got = run_driver(3, h12[FloatType.Q40], tmp_path / "auto.npz", "--weights", "auto")
    assert got["logits"].shape == (len(IDS) + STEPS - 1, 256) and np.isfinite(got["logits"]).all()


def test_streamed_weights_give_the_same_bits_with_no_model_on_the_other_ranks(h12, tmp_path):
    model = h12[FloatType.Q40]
    local = run_driver(3, model, tmp_path / "local.npz")
    out = tmp_path / "streamed.npz"
    cmd = mpiexec_command(1) + [sys.executable, str(DRIVER), str(model), str(out), "--stream-weights", ":", "-n", "2",
                                sys.executable, str(DRIVER), str(tmp_path / "absent.m"), str(out), "--stream-weights"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(np.load(out)["logits"], local["logits"])


def test_serve_under_mpiexec_answers_the_openai_client(tmp_path):
    from dllama.tokenizer.from_hf import convert_tokenizer

    folder = require_fixtures(CONFORMANCE / "tiny-llama")  # 2 kv heads: 2 ranks
    model, tokenizer = folder / "expected_f32.m", tmp_path / "tiny-llama.t"
    tokenizer.write_bytes(convert_tokenizer(folder).to_bytes())
    proc = subprocess.Popen([*mpiexec_command(2), "dllama-run", "mpi", "serve", "--model", str(model), "--tokenizer",
                             str(tokenizer), "--max-seq-len", "256", "--buffer-float-type", "f32", "--nthreads", "1",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env())
    log = LogWatcher(proc.stderr)
    try:
        url = f"http://{LOOPBACK}:{log.port()}"  # the OS's port, from the server's log line
        wait_for_health(url, proc)
        engine, tok = load_engine_and_tokenizer(model, tokenizer, 256)
        messages = [{"role": "user", "content": "Hello from MPI"}]
        ids = tok.encode(tok.render_chat(messages), add_bos=False)
        single_node = tok.decode(local_generation(engine, tok, ids, 12, Sampling(temperature=0.0)))
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        replies: list = []  # two at once, in two of the KV cache slots
        threads = [threading.Thread(target=lambda: replies.append(client.chat.completions.create(
            model="m", messages=messages, max_tokens=12, temperature=0))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.choices[0].message.content for r in replies] == [single_node] * 2
        # no --parallel: what every rank's memory holds (KiBs of KV cache a slot: 4), agreed by the ranks
        assert httpx.get(f"{url}/health").json()["parallel"] == 4
        assert "4 conversations at once (--parallel 4, what every node's memory holds)" in log.text()
        proc.send_signal(signal.SIGINT)  # mpiexec passes it on; rank 0 stops the server and then the ranks
        proc.wait(20)
        log.join(10)
        # 130: interrupted, as dllama-run
        assert proc.returncode in (0, 130) and "error:" not in log.text(), log.text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_until_killed(model: Path, tmp_path: Path, while_: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([*mpiexec_command(3), sys.executable, str(DRIVER), str(model),
                             str(tmp_path / "out.npz"), "--until-killed", while_, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    ranks = dict(re.match(r"rank (\d+) pid (\d+) host (\S+)", proc.stdout.readline()).group(1, 2) for _ in range(3))
    return proc, ranks


def one_error_line(proc: subprocess.Popen, err: str) -> str:
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


@pytest.mark.parametrize("while_, rank", [("busy", "2"), ("idle", "2")])
def test_a_killed_rank_is_named_by_rank_0_as_dead(h12, tmp_path, while_, rank):
    proc, ranks = start_until_killed(h12[FloatType.Q40], tmp_path, while_)
    try:
        os.kill(int(ranks[rank]), signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    error = one_error_line(proc, err)
    assert f"rank {rank} on {os.uname().nodename}" in error and f"pid {ranks[rank]}" in error and "died" in error
    assert "answered nothing" not in error  # noticed by its death, not after the 30 s progress timeout


def test_a_frozen_rank_is_named_after_the_progress_timeout(h12, tmp_path):
    proc, ranks = start_until_killed(h12[FloatType.Q40], tmp_path, "busy", "--progress-timeout", "3")
    try:
        os.kill(int(ranks["2"]), signal.SIGSTOP)
        _, err = proc.communicate(timeout=20)  # 3 s, then mpiexec ends the job
    finally:
        os.kill(int(ranks["2"]), signal.SIGCONT) if proc.poll() is None else None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    error = one_error_line(proc, err)
    assert f"rank 2 on {os.uname().nodename} (pid {ranks['2']}) answered nothing for 3 s" in error, error


@pytest.mark.parametrize("problem", ["missing", "different"])
def test_a_bad_model_on_one_rank_is_refused_before_any_exchange(h12, tmp_path, problem):
    good = h12[FloatType.Q40]
    bad = tmp_path / "absent.m" if problem == "missing" else write_random_model(
        tmp_path / "other.m", FloatType.Q40, n_heads=12, n_kv_heads=4, head_dim=32, hidden_dim=384, seed=7)
    cmd = mpiexec_command(2) + [sys.executable, str(DRIVER), str(good), str(tmp_path / "a.npz"), ":", "-n", "1",
                                sys.executable, str(DRIVER), str(bad), str(tmp_path / "b.npz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert f"rank 2 on {os.uname().nodename}" in errors[0]
    assert ("does not exist" if problem == "missing" else "different") in errors[0]
    assert not (tmp_path / "a.npz").exists()


@pytest.mark.parametrize("command, stdin", [([], None), (["chat"], "Hello\nAnd then?\n\n")])
def test_generate_and_chat_under_mpiexec_print_what_one_node_prints(command, stdin):
    """`dllama-run mpi` and `dllama-run mpi chat` on 2 ranks against dllama-run on one node: the same text,
    greedy, f32 buffers (the cluster's float32 sums give one node's argmax on tiny-llama). The chat has two
    turns, the second reusing the cluster's KV cache."""
    folder = require_fixtures(CONFORMANCE / "tiny-llama")
    args = [*command, "--model", str(folder / "expected_f32.m"), "--tokenizer", str(folder / "expected.t"),
            "--temperature", "0", "--steps", "12", "--nthreads", "1"] + ([] if command else ["--prompt", "Hello world"])
    one = subprocess.run(["dllama-run", *args], input=stdin, capture_output=True, text=True, timeout=120, env=env())
    two = subprocess.run([*mpiexec_command(2), "dllama-run", "mpi", *args, "--buffer-float-type", "f32"], input=stdin,
                         capture_output=True, text=True, timeout=180, env=env())
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and len(one.stdout) > len("Hello world")
    assert "rank 1 on " in two.stderr and "heads 2-3" in two.stderr  # half the model ran on the second rank
    if command:
        assert one.stderr.count("generated:") == two.stderr.count("generated:") == 2  # both turns answered
