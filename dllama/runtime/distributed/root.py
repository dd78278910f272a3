"""The root node: `dllama-run --workers host:port,...`.

`DistributedEngine` is the single-node `Engine` (forward(token_ids, pos) -> logits, reset()) with
node 0's share of the layers (none for a coordinator root) and a TCP `Exchange`, so generation,
chat and the API server run unchanged on a cluster. The root looks up the embedding, sends x to
the workers, relays every computing node's partials to every worker and gathers the logits. After
a worker is lost, `reconnect()` builds the same cluster again (dllama-run serve calls it).
"""
from __future__ import annotations

import os
import re
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from dllama.errors import DllamaError
from dllama.formats import ModelFile
from dllama.runtime import dispatch
from dllama.runtime.distributed.auth import (
    KEY_ENV,
    PROOF_BYTES,
    frame_macs,
    new_nonce,
    proves,
    root_proof,
    worker_proof,
)
from dllama.runtime.distributed.exchange import (
    SEAMS,
    PeerFailed,
    decode_logits,
    decode_partial,
    encode_partial,
    encode_sum,
    mesh_partials,
    parse_partial,
    partial_nbytes,
    relays_sums,
    slice_owners,
    slice_ranges,
    slices_sum,
    sum_partials,
)
from dllama.runtime.distributed.node_memory import DEFAULT_MAX_PARALLEL, cluster_weights, parallel_that_fits
from dllama.runtime.distributed.probe import auto_weights, node_info
from dllama.runtime.distributed.protocol import (
    CONNECT_TIMEOUT_S,
    DEFAULT_PORT,
    EXCHANGE_MESH,
    EXCHANGE_SLICES,
    EXCHANGE_STAR,
    FRAME_HEADER,
    HANDSHAKE_MAX_FRAME,
    HANDSHAKE_TIMEOUT_S,
    LOGITS_HEAD,
    MAX_SLOTS,
    MESH_OK,
    MESH_TOKEN_BYTES,
    MESH_UNREACHABLE,
    PARTIAL_HEAD,
    PROGRESS_TIMEOUT_S,
    BufferType,
    Channel,
    Frame,
    Hello,
    NodeInfo,
    PeerSilent,
    ProtocolError,
    as_float32,
    auth_payload,
    check_greeting,
    configure_socket,
    forward_parts,
    mesh_payload,
    model_identity,
    parse_auth_ok,
    parse_challenge,
    parse_ready,
    send_preamble,
)
from dllama.runtime.distributed.slices import load_local_slices, stream_slices
from dllama.runtime.distributed.weights import node_weights
from dllama.runtime.engine import PREFILL_BATCH, Engine, EngineError, SlotRun, uses_q80_buffers
from dllama.runtime.model import NodeLayers, Places, logit_rows
from dllama.runtime.split import ClusterSplit


class WorkerError(DllamaError, RuntimeError):
    """A worker refused, vanished or broke the protocol; the message names it."""


def parse_workers(text: str) -> list[tuple[str, int]]:
    """'pi1:9999,pi2' -> [('pi1', 9999), ('pi2', 9999)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", str(DEFAULT_PORT))
        if not port.isdigit() or not 0 < int(port) < 65536 or not host:
            raise WorkerError(f"cannot read worker address {item!r}: write host:port, e.g. pi1:9999")
        out.append((host.strip("[]"), int(port)))
    return out


@dataclass
class WorkerLink:
    node: int
    address: tuple[str, int]
    sock: socket.socket | None = None
    chan: Channel | None = None
    streamed_bytes: int = 0
    greeted: bool = False  # the peer proved to be a dllama worker: only then does it get our bytes
    peer_names: dict[int, str] = field(default_factory=dict)  # node -> name of every worker of the cluster

    @property
    def name(self) -> str:
        return f"worker {self.address[0]}:{self.address[1]} (node {self.node})"


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    tokens: int = 0


EARLY_SEND_BYTES = 16 * 1024  # below the smallest default TCP send buffer
EXCHANGES = ("mesh", "star", "slices")
FRAME_OVERHEAD = FRAME_HEADER.size  # what traffic counts per frame besides its payload (as _recv does)


@contextmanager
def blame(link: WorkerLink) -> Iterator[None]:
    """Turn any failure on a link into a WorkerError naming the worker (and the fix, where known)."""
    host, port = link.address
    try:
        yield
    except ConnectionRefusedError:
        raise WorkerError(f"{link.name}: connection refused; start `dllama-run worker --port {port}` "
                          f"on {host} first") from None
    except (socket.timeout, TimeoutError):
        raise WorkerError(f"{link.name}: no answer in time; check the address and that nothing blocks the "
                          "port") from None
    except PeerSilent as err:
        raise WorkerError(f"{link.name}: {err} while it should be computing: it is frozen (stopped, swapping, "
                          "hung) or its network is down; check that board") from None
    except (ProtocolError, OSError) as err:
        what = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
        raise WorkerError(silent_peer_named(link, what) or f"{link.name}: {what}") from None


REPORTED_SILENCE = re.compile(r"node (\d+): (sent nothing for \d+ s)")


def silent_peer_named(link: WorkerLink, report: str) -> str | None:
    """A worker that heard nothing from a mesh peer while both were computing reports it (exchange.PeerFailed);
    the silent peer is the one to name. The root and the reporter wait on it with the same timeout, so which
    of them notices first is a race: either way the user reads the frozen board's name."""
    match = REPORTED_SILENCE.fullmatch(report)
    if not match or int(match.group(1)) not in link.peer_names:
        return None
    return (f"{link.peer_names[int(match.group(1))]}: {match.group(2)} to node {link.node} while it should be "
            "computing: it is frozen (stopped, swapping, hung) or its network is down; check that board")


class TcpExchange:
    """The root's side of the exchange seams (engine.Exchange) over one socket per worker."""

    def __init__(self, split: ClusterSplit, links: list[WorkerLink], buffer_type: BufferType, mesh: bool = False,
                 slices: bool = False):
        self.split = split
        self.computing = split.computing
        self.links = links
        self.buffer_type = buffer_type
        self.traffic = Traffic()
        self.mesh = mesh  # the direct exchange: the workers send each other their partials (issue 30)
        self.slices = slices  # over the mesh's links: each worker sums a slice (exchange.slices_sum)

    carries_steps = True  # FORWARD says each token's slot and position: Engine.step's sequences share a pass

    def begin(self, x: np.ndarray, pos: int | Places, logits: str | int = "all") -> None:
        """Every worker gets x and each token's place (slot, position), and how many last rows want logits."""
        places = Places.of(pos, len(x))
        parts = forward_parts(x, places.slots, places.positions, logit_rows(logits, len(x)))
        for link in self.links:
            self._send(link, Frame.FORWARD, *parts)
        self.traffic.tokens += len(x)

    def reduce_into(self, x: np.ndarray, partial: np.ndarray | None, layer: int, stage: str) -> None:
        """Receive every worker's partial, send each worker what it lacks, add all in node order.

        What a worker lacks goes out as the other nodes' partials, or, from 5 computing nodes with
        q80 (3 with f32), as their float32 sum, which is smaller (exchange.relays_sums). The root's
        own partial goes out first when it is small enough to sit in the socket buffer (a decode
        step's always is): a worker slower than the root then finds it already there. Large
        (prefill) partials wait until the workers' have been read, so that the root and a worker
        never both block sending to each other (docs/PROTOCOL.md). A coordinator root has no
        partial of its own."""
        n, dim = x.shape
        seam = SEAMS[stage]
        if self.mesh and self.slices:
            x += self._slices_sum(partial, n, dim, layer, seam)
            return
        if self.mesh:
            x += self._mesh_sum(partial, n, dim, layer, seam)
            return
        sums = relays_sums(len(self.computing), dim, self.buffer_type)
        wire = {0: encode_partial(partial, self.buffer_type)} if partial is not None else {}
        limit = PARTIAL_HEAD.size + partial_nbytes(n, dim, self.buffer_type)
        early = not sums and partial is not None and limit <= EARLY_SEND_BYTES
        if early:
            for link in self.links:
                self._send(link, Frame.PARTIAL, PARTIAL_HEAD.pack(layer, seam, 0), wire[0])
        for link in self.links:
            wire[link.node] = self._recv_partial(link, layer, seam, limit)
        total = sum_partials([decode_partial(wire[i], n, dim, self.buffer_type) for i in self.computing])
        if sums:
            for link in self.links:
                self._send(link, Frame.SUM, *encode_sum(total, layer, seam))
        else:
            self._relay_partials(wire, layer, seam, skip_root=early)
        x += total

    def _mesh_sum(self, partial: np.ndarray | None, n: int, dim: int, layer: int, seam: int) -> np.ndarray:
        """The direct exchange: the root's partial to every worker, every worker's from it; no relaying."""
        own = encode_partial(partial, self.buffer_type) if partial is not None else None
        limit = PARTIAL_HEAD.size + partial_nbytes(n, dim, self.buffer_type)
        peers = {link.node: link.chan for link in self.links}
        try:
            got = mesh_partials(0, own, peers, self.computing, layer, seam, limit)
        except PeerFailed as e:
            with blame(next(link for link in self.links if link.node == e.node)):
                raise e.cause from None
        frame = FRAME_OVERHEAD + PARTIAL_HEAD.size
        self.traffic.sent += (frame + len(own)) * len(self.links) if own is not None else 0
        self.traffic.received += sum(frame + len(got[i]) for i in self.computing if i != 0)
        return sum_partials([decode_partial(got[i], n, dim, self.buffer_type) for i in self.computing])

    def _slices_sum(self, partial: np.ndarray | None, n: int, dim: int, layer: int, seam: int) -> np.ndarray:
        """The slices exchange: the root's partial, a slice to each worker; every slice's sum back."""
        peers = {link.node: link.chan for link in self.links}
        try:
            total = slices_sum(0, partial, peers, self.computing, layer, seam, n, dim, self.buffer_type)
        except PeerFailed as e:
            with blame(next(link for link in self.links if link.node == e.node)):
                raise e.cause from None
        frame = FRAME_OVERHEAD + PARTIAL_HEAD.size
        for node, (first, stop) in slice_ranges(dim, slice_owners(self.computing), self.buffer_type).items():
            nbytes = frame + partial_nbytes(n, stop - first, self.buffer_type)
            self.traffic.sent += nbytes if partial is not None and node != 0 else 0
            self.traffic.received += nbytes if node != 0 else 0
        return total

    def _recv_partial(self, link: WorkerLink, layer: int, seam: int, limit: int) -> memoryview:
        payload = self._recv(link, Frame.PARTIAL, limit)
        with blame(link):
            sender, data = parse_partial(payload, layer, seam, self.computing)
            if sender != link.node:
                raise ProtocolError(f"sent the partial of node {sender}")
        return data

    def _relay_partials(self, wire: dict[int, memoryview], layer: int, seam: int, skip_root: bool) -> None:
        """Every worker gets every other computing node's partial (the root's already, if sent early)."""
        for link in self.links:
            frames = [(Frame.PARTIAL, (PARTIAL_HEAD.pack(layer, seam, node), wire[node]))
                      for node in self.computing if node != link.node and not (skip_root and node == 0)]
            if not frames:
                continue
            with blame(link):
                self.traffic.sent += link.chan.send_frames(frames) if skip_root else \
                    sum(link.chan.send_frame(kind, *parts) for kind, parts in frames)

    def gather_logits(self, logits_slice: np.ndarray) -> np.ndarray:
        n = len(logits_slice)
        if n == 0:  # a prompt batch before its last: no logits, and no round trip to wait for
            return np.empty((0, self.split.nodes[-1].vocab[1]), dtype=np.float32)
        parts = [logits_slice]
        for link in self.links:
            v0, v1 = self.split.nodes[link.node].vocab
            payload = self._recv(link, Frame.LOGITS, LOGITS_HEAD.size + n * (v1 - v0) * 4)
            with blame(link):
                parts.append(decode_logits(payload, n, v1 - v0))
        return np.concatenate(parts, axis=1)

    def _send(self, link: WorkerLink, kind: Frame, *parts) -> None:
        with blame(link):
            self.traffic.sent += link.chan.send_frame(kind, *parts)

    def _recv(self, link: WorkerLink, kind: Frame, limit: int) -> memoryview:
        with blame(link):
            _, payload = link.chan.recv_frame(limit, expect=(kind,))
        self.traffic.received += 8 + len(payload)
        return payload


def open_link(link: WorkerLink, key: bytes | None) -> None:
    """Connect, hear the worker's preamble and challenge, prove the cluster key and check the worker's
    proof (auth.py). Without a key on either side, nothing is proven and frames carry no MAC."""
    with blame(link):
        link.sock = socket.create_connection(link.address, timeout=CONNECT_TIMEOUT_S)
        link.chan = Channel(link.sock)
        configure_socket(link.sock, HANDSHAKE_TIMEOUT_S)
        check_greeting(link.chan, link.name)
        _, payload = link.chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.CHALLENGE,))
        needs_key, worker_nonce = parse_challenge(payload)
        if needs_key and key is None:
            raise ProtocolError(f"this worker needs the cluster key: give the root the same key (--cluster-key-file "
                                f"or {KEY_ENV})")
        if key is not None and not needs_key:
            raise ProtocolError("this worker runs without a cluster key, so it cannot prove it is yours: start it "
                                f"with the same key as the root (--cluster-key-file or {KEY_ENV})")
        nonce = new_nonce()
        proof = root_proof(key, worker_nonce, nonce) if key is not None else bytes(PROOF_BYTES)
        send_preamble(link.sock, (Frame.AUTH, auth_payload(nonce, proof)))
        link.greeted = True
        _, payload = link.chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.AUTH_OK,))
        if key is not None:
            if not proves(worker_proof(key, worker_nonce, nonce), parse_auth_ok(payload)):
                raise ProtocolError("did not prove the cluster key: it is not your worker, or it has another key")
            to_worker, to_root = frame_macs(key, worker_nonce, nonce)
            link.chan.authenticate(send_mac=to_worker, recv_mac=to_root)


def probe_link(link: WorkerLink, log: Callable[[str], None]) -> NodeInfo:
    """--weights auto: the worker's memory and speed (PROBE/INFO, before HELLO)."""
    with blame(link):
        link.chan.send_frame(Frame.PROBE)
        _, payload = link.chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.INFO,))
        info = NodeInfo.parse(payload)
    log(f"{link.name}: {info.available >> 20} MiB free, {info.speed / 1e9:.2f} G q40 weights/s")
    return info


def measure_weights(workers: list[tuple[str, int]], root_compute: str = "all", nthreads: int | None = None,
                    log: Callable[[str], None] = lambda msg: None, cluster_key: bytes | None = None
                    ) -> tuple[float, ...]:
    """What --weights auto would choose for this root and these workers, without starting a session
    (`dllama-run plan --weights auto --workers ...`): each worker goes back to waiting."""
    links = [WorkerLink(i + 1, address) for i, address in enumerate(workers)]
    try:
        infos = [node_info(nthreads)]
        for link in links:
            open_link(link, cluster_key)
            infos.append(probe_link(link, log))
    finally:
        for link in links:
            if link.sock is not None:
                link.sock.close()
    return measured_weights(infos, root_compute)


def asks_auto_weights(weights: Sequence[float] | str | None) -> bool:
    return isinstance(weights, str) and weights.strip().lower() == "auto"


def measured_weights(infos: list, root_compute: str) -> tuple[float, ...]:
    """One weight per node (float32, as a HELLO carries them) from each node's probed memory and speed."""
    return as_float32(auto_weights(infos, root_compute != "none"))


def fixed_weights(n_nodes: int, weights: Sequence[float] | str | None, root_compute: str) -> tuple[float, ...]:
    """One weight per node as a HELLO carries them (float32), from (2, 1, 1), "2,1,1" or None (equal)."""
    text = weights if weights is None or isinstance(weights, str) else ",".join(repr(float(w)) for w in weights)
    return as_float32(cluster_weights(n_nodes, text, root_compute))


def exchange_type(h, buffer_type: BufferType | str | None) -> BufferType:
    if buffer_type is None:  # as the reference: q80 buffers for quantized weights, f32 for f32 (FORMAT.md §2)
        return BufferType.Q80 if uses_q80_buffers(h) else BufferType.F32
    return BufferType.parse(buffer_type) if isinstance(buffer_type, str) else buffer_type


class DistributedEngine(Engine):
    """The root of a cluster. `weights`: None (equal shares), one number per node (root first),
    "2,1,1", or "auto" (from each node's memory and speed, probed at connect time);
    `root_compute="none"`: the root holds no layer slices and only coordinates; `cluster_key`: the
    key the workers were started with (auth.load_cluster_key), None for workers without one; `slots`: the
    sequences every node keeps a KV cache (slice) for, None for what every node's free memory holds (probed
    at connect time, at most node_memory.DEFAULT_MAX_PARALLEL)."""

    def __init__(self, model_path: str | os.PathLike, workers: list[tuple[str, int]], max_seq_len: int = 2048,
                 buffer_type: BufferType | str | None = None, nthreads: int | None = None,
                 log: Callable[[str], None] | None = None, weights: Sequence[float] | str | None = None,
                 root_compute: str = "all", cluster_key: bytes | None = None, exchange: str = "mesh",
                 slots: int | None = 1):
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        dispatch.implementation()  # builds the compiled kernels on a first run, before workers wait for them
        model = ModelFile(model_path)
        h = model.header
        n_nodes = 1 + len(workers)
        self.auto_weights = asks_auto_weights(weights)
        # a bad split is refused before connecting to anyone (with auto weights: the node count)
        self.split = ClusterSplit.plan(h, n_nodes, fixed_weights(n_nodes, None if self.auto_weights else weights,
                                                                  root_compute))
        max_seq_len = min(max_seq_len, h.max_seq_len)
        if max_seq_len < 1:
            raise EngineError(f"max_seq_len {max_seq_len} must be at least 1")
        if problem := dispatch.threads_problem(nthreads):
            raise EngineError(problem)
        if slots is not None and not 1 <= slots <= MAX_SLOTS:
            raise EngineError(f"{slots} KV cache slots: a cluster keeps 1 to {MAX_SLOTS} (--parallel)")
        buffer_type = exchange_type(h, buffer_type)
        self.links = [WorkerLink(i + 1, addr) for i, addr in enumerate(workers)]
        for link in self.links:
            link.peer_names = {other.node: other.name for other in self.links}
        self.n_nodes = n_nodes
        self.cluster_key = cluster_key
        if exchange not in EXCHANGES:
            raise EngineError(f"--exchange {exchange!r}: use mesh (every node sends its partials straight to every "
                              "other; the default), slices (each worker sums a slice: fewer bytes, one more latency) "
                              "or star (through the root, where workers cannot reach each other)")
        self.asks_mesh = exchange in ("mesh", "slices")
        self.asks_slices = exchange == "slices"
        self.uses_mesh = False
        self.model_file, self.buffer_type = model, buffer_type
        self.identity = model_identity(model.path)
        self.n_slots = slots
        self.lost: WorkerError | None = None  # the failure that broke the session, until reconnect()
        self.busy = threading.RLock()  # a step, or a reconnect: one at a time (serve reconnects from its own thread)
        try:
            self._connect_all(max_seq_len, nthreads, root_compute)
            share = self.split.nodes[0]
            weights_0 = node_weights(h, load_local_slices(model.path, h, share), share)
            layers = NodeLayers(h, weights_0, share, max_seq_len, self.n_slots)
            self._wait_loaded()
        except BaseException:
            self.close()
            raise
        # the embedding's rows are read from the file as tokens are looked up (ModelFile.rows)
        tcp = TcpExchange(self.split, self.links, buffer_type, self.uses_mesh, self.asks_slices)
        super().__init__(h, layers, tcp, max_seq_len, nthreads, embedding=model.rows("embedding"), model=model)

    @property
    def traffic(self) -> Traffic:
        return self.exchange.traffic

    def forward(self, token_ids: Sequence[int], pos: int, last_only: bool = False) -> np.ndarray:
        with self._session():
            return super().forward(token_ids, pos, last_only)

    def step(self, runs: Sequence[SlotRun]) -> list[np.ndarray]:
        """Engine.step over the cluster: one FORWARD with every run's tokens and places, and each exchange
        moves the partials of all of them in one message."""
        with self._session():
            return super().step(runs)

    @contextmanager
    def _session(self) -> Iterator[None]:
        """One forward or step at a time; after a lost worker every one fails at once with the same
        WorkerError (every sequence of a serve --parallel), until reconnect()."""
        with self.busy:
            if self.lost is not None:
                raise WorkerError(str(self.lost))
            try:
                yield
            except WorkerError as e:
                self.lost = e
                raise

    def reconnect(self) -> None:
        """After a lost worker: close every link, then handshake (and stream slices) again with the same
        split. Every slot's KV cache starts empty. Raises WorkerError while a worker is still unreachable."""
        with self.busy:
            self.close()
            try:
                self._handshake_all(self.max_seq_len)
                self._wait_loaded()
            except BaseException:
                self.close()
                raise
            self.exchange.mesh = self.uses_mesh
            self.lost = None
            self.reset()

    def _connect_all(self, max_seq_len: int, nthreads: int | None, root_compute: str) -> None:
        for link in self.links:
            open_link(link, self.cluster_key)
        h = self.model_file.header
        if self.auto_weights or self.n_slots is None:
            infos = [node_info(nthreads)] + [probe_link(link, self.log) for link in self.links]
        if self.auto_weights:
            self.split = ClusterSplit.plan(h, self.n_nodes, measured_weights(infos, root_compute))
        if self.n_slots is None:
            self.n_slots = parallel_that_fits(h, max_seq_len, [i.available for i in infos], PREFILL_BATCH,
                                              DEFAULT_MAX_PARALLEL, self.split.weights)
        for share in self.split.nodes:
            self.log(f"node {share.node}: {share.describe()}")
        self._handshake_all(max_seq_len, opened=True)

    def _handshake_all(self, max_seq_len: int, opened: bool = False) -> None:
        """Every worker accepts its HELLO (or refuses it, named) before any slice is streamed; the
        workers' handshake deadline runs from the connect, so all are greeted first."""
        h = self.model_file.header
        if not opened:
            for link in self.links:
                open_link(link, self.cluster_key)
        local = {}
        for link in self.links:
            hello = Hello(link.node, self.n_nodes, max_seq_len, self.buffer_type, self.identity, h.to_bytes(),
                          self.split.weights, self.n_slots)
            with blame(link):
                link.chan.send_frame(Frame.HELLO, hello.to_bytes())
                _, payload = link.chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.READY,))
                local[link.node] = parse_ready(payload)
                link.sock.settimeout(PROGRESS_TIMEOUT_S)  # a busy worker's heartbeat comes every second
        self.uses_mesh = self._choose_exchange()
        for link in self.links:
            if local[link.node]:
                self.log(f"{link.name} loads its slices from its own copy of the model")
                continue
            self.log(f"streaming node {link.node}'s slices to {link.name}")
            with blame(link):
                link.streamed_bytes = stream_slices(link.chan, self.model_file.path, h, self.split.nodes[link.node])

    def _choose_exchange(self) -> bool:
        """The mesh where asked for and every worker reaches every other (each says so before any slice
        is streamed), else the star, with one line naming the worker that could not."""
        mesh = self.asks_mesh and (len(self.links) >= 2 or self.asks_slices)
        if mesh:
            token = os.urandom(MESH_TOKEN_BYTES)
            plan = mesh_payload(token, [link.address for link in self.links])
            for link in self.links:
                with blame(link):
                    link.chan.send_frame(Frame.MESH, plan)
            problems = []  # (status, link, text): one that could not dial names the unreachable peer best
            for link in self.links:
                with blame(link):
                    _, status = link.chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.MESH_STATUS,))
                if status[0] != MESH_OK:
                    problems.append((status[0] != MESH_UNREACHABLE, link.node, link.name,
                                     bytes(status[1:]).decode("utf-8", "replace")))
            if problems:
                _, _, name, text = min(problems)
                self.log(f"{name} {text}; the partials go through the root instead (the star exchange; "
                         "--exchange star chooses it at once)")
                mesh = False
        for link in self.links:
            with blame(link):
                choice = (EXCHANGE_SLICES if self.asks_slices else EXCHANGE_MESH) if mesh else EXCHANGE_STAR
                link.chan.send_frame(Frame.EXCHANGE, bytes([choice]))
        return mesh

    def _wait_loaded(self) -> None:
        for link in self.links:
            with blame(link):
                link.chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.LOADED,))

    def close(self) -> None:
        for link in getattr(self, "links", []):
            if link.sock is not None:
                try:
                    if link.greeted:
                        link.sock.settimeout(1.0)
                        link.chan.send_frame(Frame.BYE)
                except (ProtocolError, OSError):
                    pass
                link.sock.close()
                link.sock = link.chan = None
                link.greeted = False

    def __enter__(self) -> "DistributedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
