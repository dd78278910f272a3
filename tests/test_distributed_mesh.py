"""The direct exchange (issue 30): every node sends its partial straight to every other over links the
workers open to each other; the same bits as the star, which stays available and takes over, saying
so, when a worker cannot reach another."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from distributed_helpers import loopback_workers, write_random_model

from dllama.formats import FloatType
from dllama.runtime.distributed.root import DistributedEngine, WorkerError

PROMPT = [(11 * i) % 256 for i in range(1, 51)]  # 50 tokens: partials over 16 kB, exchanged pair by pair
KEY = b"mesh test key, 32 bytes long...."


@pytest.fixture(scope="module")
def h12(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mesh")
    return {ft: write_random_model(folder / f"h12_{ft.name}.m", ft, n_heads=12, n_kv_heads=4, head_dim=32,
                                   hidden_dim=384) for ft in (FloatType.F32, FloatType.Q40)}


def run(engine, steps: int = 3) -> np.ndarray:
    """A prompt's logits, then greedy decode steps' (the small partials' path)."""
    out = [engine.forward(PROMPT, 0)]
    for i in range(steps):
        out.append(engine.forward([int(np.argmax(out[-1][-1]))], len(PROMPT) + i))
    return np.concatenate(out)


def engine(path, workers, buffer_type, exchange, log=lambda msg: None, **kw):
    return DistributedEngine(path, [w.address if hasattr(w, "address") else w for w in workers], max_seq_len=64,
                             buffer_type=buffer_type, exchange=exchange, log=log, **kw)


@pytest.mark.parametrize("n_nodes", [3, 5, 8])
def test_mesh_gives_the_stars_bits_with_q80_buffers(h12, n_nodes):
    path = h12[FloatType.Q40]
    with loopback_workers(n_nodes - 1) as workers:
        with engine(path, workers, "q80", "mesh") as mesh:
            assert mesh.uses_mesh
            direct = run(mesh)
        with engine(path, workers, "q80", "star") as star:
            assert not star.uses_mesh
            relayed = run(star)
    assert np.array_equal(direct, relayed)


@pytest.mark.parametrize("exchange", ["mesh", "star"])
@pytest.mark.parametrize("n_nodes", [2, 3, 8])
def test_f32_buffers_give_one_nodes_logits(h12, n_nodes, exchange):
    path = h12[FloatType.F32]
    with loopback_workers(n_nodes - 1) as workers, engine(path, [], "f32", "star") as one, \
            engine(path, workers, "f32", exchange) as many:
        assert many.uses_mesh == (exchange == "mesh" and n_nodes > 2)
        assert np.abs(run(many) - run(one)).max() <= 1e-4


def test_workers_with_the_cluster_key_prove_it_to_each_other(h12):
    path = h12[FloatType.Q40]
    with loopback_workers(3, cluster_key=KEY) as workers:
        with engine(path, workers, "q80", "mesh", cluster_key=KEY) as mesh:
            assert mesh.uses_mesh
            direct = run(mesh, steps=1)
        with engine(path, workers, "q80", "star", cluster_key=KEY) as star:
            assert np.array_equal(direct, run(star, steps=1))


class OneConnectionProxy:
    """Forwards the first connection to `target` and then stops listening: the root reaches the worker
    through it, another worker dialling the same address finds nobody (a firewall, a NAT)."""

    def __init__(self, target: tuple[str, int]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.target = target
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        self.listener.close()
        upstream = socket.create_connection(self.target)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_worker_that_cannot_reach_another_is_named_and_the_star_takes_over(h12):
    path = h12[FloatType.Q40]
    said = []
    with loopback_workers(2) as workers:
        proxy, second = OneConnectionProxy(workers[0].address), workers[1].address
        with engine(path, [proxy.address, workers[1].address], "q80", "mesh", log=said.append) as fallback:
            assert not fallback.uses_mesh
            relayed = run(fallback, steps=1)
    lines = [line for line in said if "star exchange" in line]
    assert len(lines) == 1 and f"127.0.0.1:{second[1]} (node 2)" in lines[0], said
    assert f"{proxy.address[0]}:{proxy.address[1]}" in lines[0] and "connection refused" in lines[0]
    assert "streaming" not in " ".join(said[:said.index(lines[0])])  # named before any slice moved
    with loopback_workers(2) as workers, engine(path, workers, "q80", "star") as star:
        assert np.array_equal(relayed, run(star, steps=1))


def test_a_frozen_worker_of_a_mesh_is_named_within_10_s(h12):
    proc = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"listening on ([\d.]+):(\d+)", proc.stderr.readline())
        assert match
        frozen = (match.group(1), int(match.group(2)))
        with loopback_workers(1) as (other,):
            many = engine(h12[FloatType.Q40], [other.address, frozen], "q80", "mesh")
            assert many.uses_mesh
            token, stopped = 1, None
            with pytest.raises(WorkerError, match=rf"127\.0\.0\.1:{frozen[1]} \(node 2\): .*frozen"):
                for pos in range(60):
                    if pos == 3:
                        proc.send_signal(signal.SIGSTOP)
                        stopped = time.monotonic()
                    token = int(np.argmax(many.forward([token], pos)[-1]))
            assert stopped is not None and time.monotonic() - stopped < 10
            many.close()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
