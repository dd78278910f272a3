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

import numpy as np
import pytest
from distributed_helpers import (
    F32_CLUSTER_TOLERANCE,
    assert_greedy_matches_up_to_near_ties,
    loopback_workers,
    write_random_model,
)

from dllama.formats import FloatType
from dllama.runtime import dispatch
from dllama.runtime.distributed.exchange import decode_partial, encode_partial, slices_sum, sum_partials
from dllama.runtime.distributed.protocol import BufferType, Channel
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


@pytest.mark.parametrize("exchange", ["mesh", "star", "slices"])
@pytest.mark.parametrize("n_nodes", [2, 3, 8])
def test_f32_buffers_give_one_nodes_logits(h12, n_nodes, exchange):
    path = h12[FloatType.F32]
    with loopback_workers(n_nodes - 1) as workers, engine(path, [], "f32", "star") as one, \
            engine(path, workers, "f32", exchange) as many:
        assert many.uses_mesh == (exchange == "slices" or (exchange == "mesh" and n_nodes > 2))
        assert np.abs(run(many) - run(one)).max() <= F32_CLUSTER_TOLERANCE


def node_links(n: int) -> list[dict[int, Channel]]:
    """A socketpair between every two of n in-process nodes: node -> {peer: Channel}."""
    links: list[dict[int, Channel]] = [{} for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            sa, sb = socket.socketpair()
            links[a][b], links[b][a] = Channel(sa), Channel(sb)
    return links


@pytest.mark.parametrize("buffer_type", [BufferType.Q80, BufferType.F32])
@pytest.mark.parametrize("n_nodes,n_tokens,coordinator,dim", [(2, 1, False, 320), (3, 50, False, 320),
                                                              (8, 1, False, 320), (8, 50, False, 320),
                                                              (5, 1, True, 320), (5, 1, False, 64)])
def test_the_slices_exchange_gives_every_node_the_same_sum(n_nodes, n_tokens, coordinator, dim, buffer_type):
    """Every node ends with the partials' sum in node order (sum_partials of what the wire carries),
    rounded once more through q80 with q80 buffers (each slice's owner sends its sum as q80), exact
    with f32; 50 tokens take the pair-by-pair path of large frames; 320 values are 10 q80 blocks
    (slices of unequal widths), 64 fewer blocks than workers."""
    rng = np.random.default_rng(n_nodes)
    computing = list(range(1 if coordinator else 0, n_nodes))
    partials = {i: rng.standard_normal((n_tokens, dim)).astype(np.float32) for i in computing}
    links, results, errors = node_links(n_nodes), {}, []

    def node(i: int) -> None:
        try:
            results[i] = slices_sum(i, partials.get(i), links[i], computing, 3, 1, n_tokens, dim, buffer_type)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(n_nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == n_nodes, errors
    on_the_wire = [decode_partial(encode_partial(partials[i], buffer_type), n_tokens, dim, buffer_type)
                   for i in computing]
    want = np.array(sum_partials(on_the_wire))
    if buffer_type == BufferType.Q80:
        dispatch.q80_roundtrip(want)
        assert not np.array_equal(want, sum_partials(on_the_wire))  # the rounding is there to be seen
    for i in range(n_nodes):
        assert np.array_equal(results[i], want), i


def test_the_slices_exchange_keeps_the_meshs_greedy_tokens_with_q80_buffers(h12):
    """One more q80 rounding per seam than the mesh: the tokens may part only at a near tie."""
    path = h12[FloatType.Q40]
    with loopback_workers(7) as some, loopback_workers(7) as others:
        with engine(path, some, "q80", "mesh") as mesh, engine(path, others, "q80", "slices") as slices:
            assert slices.uses_mesh and slices.exchange.slices
            assert_greedy_matches_up_to_near_ties(mesh, slices, np.array(PROMPT), steps=8)


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


def test_a_frozen_worker_of_a_mesh_is_named_by_the_progress_timeout(h12):
    proc = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"listening on ([\d.]+):(\d+)", proc.stderr.readline())
        assert match
        frozen = (match.group(1), int(match.group(2)))
        with loopback_workers(1) as (other,):
            many = engine(h12[FloatType.Q40], [other.address, frozen], "q80", "mesh")
            assert many.uses_mesh
            token = 1
            with pytest.raises(WorkerError, match=rf"127\.0\.0\.1:{frozen[1]} \(node 2\): .*frozen"):  # heartbeat
                for pos in range(60):
                    if pos == 3:
                        proc.send_signal(signal.SIGSTOP)
                    token = int(np.argmax(many.forward([token], pos)[-1]))
            many.close()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("killed", [1, 2])
def test_a_killed_worker_of_a_mesh_is_named_in_the_step_it_died_in(h12, killed):
    """Its peers notice the death too and leave their sessions: the root must still name the dead one,
    whichever node it is (node 1's live peer is read first, node 2's last), and in the very step that
    needed it, not after a timeout."""
    proc = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"listening on ([\d.]+):(\d+)", proc.stderr.readline())
        assert match
        dying = (match.group(1), int(match.group(2)))
        with loopback_workers(1) as (other,):
            order = [dying, other.address] if killed == 1 else [other.address, dying]
            many = engine(h12[FloatType.Q40], order, "q80", "mesh")
            assert many.uses_mesh
            token, failed_at = 1, None
            with pytest.raises(WorkerError, match=rf"127\.0\.0\.1:{dying[1]} \(node {killed}\)"):
                for pos in range(60):
                    failed_at = pos
                    if pos == 3:
                        proc.send_signal(signal.SIGKILL)
                    token = int(np.argmax(many.forward([token], pos)[-1]))
            assert failed_at == 3
            many.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_peers_report_of_silence_names_the_silent_worker():
    """Node 1 waiting on a frozen node 2 reports the silence to the root (it may notice before the root
    does): the error must name node 2's board, not the reporter's."""
    from dllama.runtime.distributed.protocol import ProtocolError
    from dllama.runtime.distributed.root import WorkerLink, blame

    links = [WorkerLink(1, ("10.0.0.1", 9999)), WorkerLink(2, ("10.0.0.2", 9999))]
    for link in links:
        link.peer_names = {other.node: other.name for other in links}
    with pytest.raises(WorkerError, match=r"^worker 10\.0\.0\.2:9999 \(node 2\): sent nothing for 6 s to node 1 .*"
                                          r"frozen"):
        with blame(links[0]):
            raise ProtocolError("node 2: sent nothing for 6 s")
    with pytest.raises(WorkerError, match=r"^worker 10\.0\.0\.1:9999 \(node 1\): node 2: checksum mismatch$"):
        with blame(links[0]):
            raise ProtocolError("node 2: checksum mismatch")  # not a silence: the reporter's own words
