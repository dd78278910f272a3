"""SmolLM2-135M (9 heads, 3 kv heads, 30 layers), a real model whose heads split unevenly (issue 14).

f32: any node count gives one node's logits (float32 rounding only). q40 with q80 buffers: every
node's partial is rounded to q80 on its own (FORMAT.md §2), and SmolLM2's FFN outputs reach ~470,
so a rounding step of a block with such a value moves logits by up to ~6 between node counts
(measured, docs/BENCHMARKS.md) while the q40 model itself is ~19 off the f32 model at worst. The
test there is that a cluster is as close to the f32 model as one node is, and that greedy
answers to chat prompts equal one node's up to a near-tie: measured over 24-token answers on 2, 3
and 9 nodes, the gap between one node's top two logits moves by 0.17-0.23 (median), 0.54-0.75
(95th percentile) and 1.14 at most between node counts, and every divergence came where one
node's top two were within 0.41; with the q40 kernels' block-order sums (one total per row) a 2-node
answer diverged where the gap was 1.19 (the logits differ by up to 2.2 between 1 and 2 nodes, in both
orders). A wrong kv head mapping diverges at once, far from any tie.
"""
from __future__ import annotations

import numpy as np
import pytest
from distributed_helpers import (
    F32_CLUSTER_TOLERANCE_SMOLLM2,
    assert_greedy_matches_up_to_near_ties,
    loopback_workers,
)

from dllama.formats import read_model_header
from dllama.runtime.distributed.node_memory import memory_plan
from dllama.runtime.distributed.root import DistributedEngine
from dllama.runtime.engine import Engine
from dllama.tokenizer import Tokenizer

SMOLLM2_NEAR_TIE = 1.5  # q40, q80 buffers: how far the top-two gap moves between node counts (above)
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. Once upon a time, there was"


@pytest.fixture(scope="module")
def prompt_ids(smollm2_files):
    return np.array(Tokenizer.load(str(smollm2_files["tokenizer"])).encode(PROMPT))


def root_of(path, workers, **kw):
    return DistributedEngine(path, [w.address for w in workers], max_seq_len=64, nthreads=1, log=lambda msg: None, **kw)


@pytest.mark.parametrize("n_nodes", [2, 3, 9])
def test_smollm2_f32_on_2_3_and_9_nodes_equals_one_node(smollm2_files, prompt_ids, n_nodes):
    path = smollm2_files["f32"]
    one = Engine.load(path, max_seq_len=64, nthreads=1)
    want = np.concatenate([one.forward(prompt_ids, 0), one.forward([42], len(prompt_ids))])
    with loopback_workers(n_nodes - 1, model_path=path) as workers, root_of(path, workers) as many:
        got = np.concatenate([many.forward(prompt_ids, 0), many.forward([42], len(prompt_ids))])
        assert [s.heads for s in many.split.nodes][:2] == {2: [(0, 5), (5, 9)], 3: [(0, 3), (3, 6)],
                                                            9: [(0, 1), (1, 2)]}[n_nodes]
    assert np.abs(got - want).max() <= F32_CLUSTER_TOLERANCE_SMOLLM2


@pytest.mark.parametrize("kw", [dict(n_nodes=2), dict(n_nodes=3), dict(n_nodes=9),
                                dict(n_nodes=3, weights=(2, 1, 1)), dict(n_nodes=3, root_compute="none")],
                         ids=["2-nodes-uneven-heads", "3-nodes", "9-nodes", "weights-2-1-1", "coordinator-root"])
def test_smollm2_q40_cluster_is_as_close_to_the_f32_model_as_one_node(smollm2_files, prompt_ids, kw):
    kw = dict(kw)
    n_nodes = kw.pop("n_nodes")
    f32 = Engine.load(smollm2_files["f32"], max_seq_len=64, nthreads=1).forward(prompt_ids, 0)
    path = smollm2_files["q40"]
    one_error = np.abs(Engine.load(path, max_seq_len=64, nthreads=1).forward(prompt_ids, 0) - f32).mean()
    with loopback_workers(n_nodes - 1, model_path=path) as workers, root_of(path, workers, **kw) as many:
        many_error = np.abs(many.forward(prompt_ids, 0) - f32).mean()
    # measured: one node 2.65, clusters 2.48-2.58 (a split bug, e.g. a wrong kv head, gives > 10)
    assert many_error <= 1.1 * one_error


def test_smollm2_two_nodes_plan_matches_what_the_root_runs(smollm2_files):
    h = read_model_header(smollm2_files["q40"])
    root, worker = memory_plan(h, 2, 64)
    assert root.share.heads == (0, 5) and worker.share.heads == (5, 9)
    assert worker.share.kv_heads == (1, 3)  # kv head 1 on both nodes


@pytest.mark.parametrize("n_nodes", [2, 3, 9])
def test_smollm2_q40_greedy_answers_equal_one_nodes_up_to_near_ties(smollm2_files, n_nodes):
    path = smollm2_files["q40"]
    tok = Tokenizer.load(str(smollm2_files["tokenizer"]))
    one = Engine.load(path, max_seq_len=96, nthreads=1)
    with loopback_workers(n_nodes - 1, model_path=path) as workers, \
            DistributedEngine(path, [w.address for w in workers], max_seq_len=96, nthreads=1,
                              log=lambda msg: None) as many:
        for question in ("What is the capital of France?", "List three prime numbers."):
            ids = np.array(tok.encode_chat([{"role": "user", "content": question}]))
            assert_greedy_matches_up_to_near_ties(one, many, ids, 20, near_tie=SMOLLM2_NEAR_TIE)


def test_smollm2_plan_and_root_refuse_10_nodes_naming_1_to_9_before_connecting(smollm2_files):
    from typer.testing import CliRunner

    from dllama.cli.dllama_run import app
    from dllama.runtime.split import SplitError

    out = CliRunner().invoke(app, ["plan", "--model", str(smollm2_files["q40"]), "--nodes", "10"])
    assert out.exit_code == 1 and "more than this model's 9 heads allow: it runs on 1 to 9 nodes" in out.output
    ok = CliRunner().invoke(app, ["plan", "--model", str(smollm2_files["q40"]), "--nodes", "10", "--root-compute",
                                  "none"])
    assert ok.exit_code == 0, ok.output  # a coordinator root and 9 computing workers
    with pytest.raises(SplitError, match="1 to 9 nodes"):  # nothing listens on these ports: refused before connecting
        DistributedEngine(smollm2_files["q40"], [("127.0.0.1", 1)] * 9)


def vm_hwm(pid: int) -> int:
    """A process's peak resident memory (reset by exec, unlike a child's ru_maxrss, which keeps its parent's)."""
    import re
    from pathlib import Path

    return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) * 1024


@pytest.mark.slow
def test_plan_predicts_a_workers_peak_memory_within_7_percent(smollm2_files, prompt_ids):
    """README's claim, measured here: a `dllama-run worker` serving half of SmolLM2's q40 through a generation
    that fills the whole KV cache the plan counts (--ignore-eos), its peak RSS against `dllama-run plan`'s
    total for node 1. Memory, not time: the machine's load does not move it (measured 86.8-86.9 MiB against
    87.7, -1%)."""
    import json
    import os
    import re
    import subprocess
    import sys

    from typer.testing import CliRunner

    from dllama.cli.dllama_run import app

    max_seq_len = 64
    plan = CliRunner().invoke(app, ["plan", "--model", str(smollm2_files["q40"]), "--nodes", "2", "--max-seq-len",
                                    str(max_seq_len), "--json"])
    assert plan.exit_code == 0, plan.output
    planned = json.loads(plan.stdout)["per_node"][1]["total"]
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1",
                               "--port", "0", "--nthreads", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        address = re.search(r"listening on ([\d.]+:\d+)", worker.stderr.readline()).group(1)
        root = subprocess.run([sys.executable, "-m", "dllama.cli.dllama_run", "--model", str(smollm2_files["q40"]),
                               "--tokenizer", str(smollm2_files["tokenizer"]), "--prompt", PROMPT, "--steps",
                               str(max_seq_len - len(prompt_ids)), "--ignore-eos", "--max-seq-len", str(max_seq_len),
                               "--workers", address, "--nthreads", "1", "--temperature", "0"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert root.returncode == 0, root.stderr[-2000:]
        measured = vm_hwm(worker.pid)
    finally:
        worker.kill()
        worker.wait()
    assert abs(measured - planned) <= 0.07 * planned, f"worker peak {measured / 2**20:.1f} MiB, plan " \
                                                      f"{planned / 2**20:.1f} MiB"
