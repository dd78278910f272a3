"""`dllama-run worker`: wait for a root, take a node's share of the model, compute it per token.

The worker runs the root's own layer loop (engine.Engine.run_layers) through a `WorkerExchange`
that talks to the root. One root at a time, the first that proves the cluster key (auth.py);
every connection's handshake runs in its own thread under a deadline, so strangers cannot hold
the worker. Whatever a connection does wrong (garbage, another protocol version, a wrong key,
sizes beyond the limits, a model that does not match `--model`), the worker answers one ERROR
line, closes that connection and goes back to waiting; so does it when the root vanishes.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dllama.errors import DllamaError
from dllama.formats import FormatError, ModelFile, ModelHeader
from dllama.runtime import dispatch
from dllama.runtime.distributed.auth import (
    KEY_ENV,
    NO_KEY_WARNING,
    PROOF_BYTES,
    AuthError,
    frame_macs,
    new_nonce,
    proves,
    root_proof,
    worker_proof,
)
from dllama.runtime.distributed.exchange import (
    SEAMS,
    decode_partial,
    decode_sum,
    encode_logits,
    encode_partial,
    mesh_partials,
    parse_partial,
    partial_nbytes,
    relays_sums,
    slices_sum,
    sum_partials,
)
from dllama.runtime.distributed.node_memory import SplitError, kv_cache_bytes, node_weight_bytes
from dllama.runtime.distributed.probe import available_memory, node_info
from dllama.runtime.distributed.protocol import (
    EXCHANGE_MESH,
    EXCHANGE_SLICES,
    HANDSHAKE_DEADLINE_S,
    HANDSHAKE_MAX_FRAME,
    HANDSHAKE_TIMEOUT_S,
    HEARTBEAT_S,
    IO_TIMEOUT_S,
    MAX_ERROR_MESSAGE,
    MESH_OK,
    MESH_TIMEOUT_S,
    MESH_UNCALLED,
    MESH_UNREACHABLE,
    PARTIAL_HEAD,
    PROGRESS_TIMEOUT_S,
    SUM_HEAD,
    WEIGHT_CHUNK,
    WEIGHTS_HEAD,
    Channel,
    Frame,
    Hello,
    ModelIdentity,
    PeerClosed,
    ProtocolError,
    auth_ok_payload,
    challenge_payload,
    check_preamble,
    configure_socket,
    forward_limit,
    greeting,
    model_identity,
    parse_auth,
    parse_forward,
    parse_mesh,
    parse_peer,
    peer_payload,
    ready_payload,
)
from dllama.runtime.distributed.slices import SliceReceiver, load_local_slices
from dllama.runtime.distributed.weights import node_weights
from dllama.runtime.engine import PREFILL_BATCH, Engine, EngineError, release_freed_heap
from dllama.runtime.model import NodeLayers, Places
from dllama.runtime.split import ClusterSplit, NodeShare

MAX_BATCH = max(64, PREFILL_BATCH)  # tokens per FORWARD; the root's Engine sends PREFILL_BATCH at most


@dataclass
class Assignment:
    """What one root asked this worker to hold and compute, checked."""

    hello: Hello
    header: ModelHeader
    split: ClusterSplit

    @property
    def share(self) -> NodeShare:
        return self.split.nodes[self.node]

    @property
    def node(self) -> int:
        return self.hello.node_index

    @property
    def n_nodes(self) -> int:
        return self.hello.n_nodes

    def forward_limit(self) -> int:
        h = self.header
        return max(forward_limit(MAX_BATCH, h.dim),
                   PARTIAL_HEAD.size + partial_nbytes(MAX_BATCH, h.dim, self.hello.buffer_type))


MAX_HANDSHAKES = 16  # connections in their handshake at once; more are closed at accept


class Worker:
    def __init__(self, host: str = "0.0.0.0", port: int = 9999, model_path: str | os.PathLike | None = None,
                 nthreads: int | None = None, log: Callable[[str], None] | None = None,
                 cluster_key: bytes | None = None):
        if problem := dispatch.threads_problem(nthreads):
            raise EngineError(f"--{problem}")
        dispatch.implementation()  # builds the compiled kernels on a first run, before a root waits for them
        self.model_path = Path(model_path) if model_path else None
        # checked now, not when a root comes: a broken or unreadable copy stops the worker at start-up
        self.identity: ModelIdentity | None = checked_model(self.model_path) if self.model_path else None
        self.key = cluster_key
        self.nthreads = nthreads
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.listener = socket.create_server((host, port), backlog=16)
        self.stop_event = threading.Event()
        self.sessions_served = 0
        self.busy_with: str | None = None  # the root being served
        self.serving = threading.Lock()     # held by the one session that serves a root
        self.handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self.refused: list[str] = []
        self.mesh = threading.Condition()  # mesh links other workers dialled in, by session token and node
        self.mesh_links: dict[bytes, dict[int, Channel]] = {}

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    def serve_forever(self) -> None:
        """Every connection gets its own handshake thread, bounded by a deadline, so a stranger that
        connects and stays silent (or dribbles bytes) never holds the worker; the first root that
        authenticates is served, any other told that the worker is busy."""
        self.log(f"worker listening on {self.address[0]}:{self.address[1]}")
        if self.key is None:
            self.log(f"warning: {NO_KEY_WARNING}")
        self.listener.settimeout(0.2)
        try:
            while not self.stop_event.is_set():
                try:
                    conn, addr = self.listener.accept()
                except socket.timeout:
                    continue
                if not self.handshakes.acquire(blocking=False):
                    conn.close()  # a flood of connections: the ones in their handshake finish within the deadline
                    continue
                threading.Thread(target=self.serve_connection, args=(conn, f"{addr[0]}:{addr[1]}"),
                                 daemon=True).start()
        finally:
            self.listener.close()

    def stop(self) -> None:
        self.stop_event.set()

    def serve_connection(self, conn: socket.socket, peer: str) -> None:
        chan = Channel(conn)
        in_handshake = [True]
        kept = False
        try:
            kept = self._serve(chan, peer, in_handshake)
            if not kept:
                self.log(f"root {peer} finished; waiting for the next root")
        except PeerClosed as e:
            self.log(f"root {peer} went away ({e}); waiting for the next root")
        except (ProtocolError, SplitError, AuthError) as e:
            self.refused.append(str(e))
            self.log(f"refused {peer}: {e}")
            chan.send_error(str(e))
        except Exception as e:  # a bug must not take the board offline: report it and keep serving
            self.refused.append(repr(e))
            self.log(f"internal error serving {peer}: {e!r}")
            chan.send_error(f"worker internal error: {e!r}")
        finally:
            if in_handshake[0]:
                self.handshakes.release()
            if self.busy_with == peer:
                self.sessions_served += 1
                self.busy_with = None  # before the close: a root that sees it may reconnect at once
                self.serving.release()
                release_freed_heap()  # the slices and the cache of the root that went
            if not kept:
                conn.close()

    # ----------------------------------------------------------------------------------------
    def _serve(self, chan: Channel, peer: str, in_handshake: list[bool]) -> bool:
        """Serve one connection; True if it became a mesh link, which the session that wants it owns."""
        configure_socket(chan.sock, HANDSHAKE_TIMEOUT_S)
        chan.deadline = time.monotonic() + HANDSHAKE_DEADLINE_S
        self._authenticate(chan, peer)
        kind, payload = chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.HELLO, Frame.PROBE, Frame.PEER))
        if kind == Frame.PEER:  # another worker of our root's cluster (it proved the key too)
            self._attach_peer(chan, *parse_peer(payload))
            return True
        self._claim(peer)  # only a root that proved the key (or any, without one) gets this far
        if kind == Frame.PROBE:  # --weights auto: what this board offers, then the HELLO
            chan.send_frame(Frame.INFO, node_info(self.nthreads).to_bytes())
            _, payload = chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.HELLO,))
        session = self._accept_hello(Hello.parse(payload))
        chan.deadline = None
        in_handshake[0] = False
        self.handshakes.release()
        self.log(f"root {peer}: node {session.node} of {session.n_nodes} ({session.share.describe()}), "
                 f"{session.hello.identity.short()}")
        chan.settimeout(IO_TIMEOUT_S)
        heartbeat = Heartbeat(chan)
        try:
            started = time.perf_counter()
            with heartbeat.busy():
                mesh, slices_exchange = self._join_mesh(chan, session)
                heartbeat.watch(mesh.values())
                slices = self._load_slices(chan, session)
                how = f"loaded from {self.model_path}" if self.identity is not None else "received"
                self.log(f"{sum(a.nbytes for a in slices.values()) / 1e6:.0f} MB of slices {how} in "
                         f"{time.perf_counter() - started:.1f} s")
                h, share = session.header, session.share
                layers = NodeLayers(h, node_weights(h, slices, share), share, session.hello.max_seq_len,
                                    session.hello.slots)
                engine = Engine(h, layers, WorkerExchange(chan, session, mesh, slices_exchange),
                                session.hello.max_seq_len,
                                self.nthreads)
                chan.send_frame(Frame.LOADED)
            if self.nthreads:
                dispatch.set_threads(self.nthreads)  # per calling thread
            self._serve_tokens(chan, session, engine, heartbeat)
        finally:
            heartbeat.stop()
            for link in locals().get("mesh", {}).values():
                link.close()
        return False

    def _authenticate(self, chan: Channel, peer: str) -> None:
        """Challenge-response (auth.py): the root proves the key, then this worker proves it too."""
        nonce = new_nonce()
        greet(chan.sock, challenge_payload(self.key is not None, nonce))  # at once: the root waits for it
        check_preamble(chan, f"peer {peer}")
        _, payload = chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.AUTH,))
        root_nonce, proof = parse_auth(payload)
        if self.key is None:
            chan.send_frame(Frame.AUTH_OK, auth_ok_payload(bytes(PROOF_BYTES)))
            return
        if not proves(root_proof(self.key, nonce, root_nonce), proof):
            raise AuthError(f"the root did not prove the cluster key: start it with the same key as this worker "
                            f"(--cluster-key-file or {KEY_ENV})")
        chan.send_frame(Frame.AUTH_OK, auth_ok_payload(worker_proof(self.key, nonce, root_nonce)))
        to_worker, to_root = frame_macs(self.key, nonce, root_nonce)
        chan.authenticate(send_mac=to_root, recv_mac=to_worker)

    def _claim(self, peer: str) -> None:
        """Become this root's worker, or tell it who has us (a root that just vanished may not have
        been noticed yet: its session gets a moment to end)."""
        if not self.serving.acquire(timeout=1.0):
            raise ProtocolError(f"this worker is busy serving the root at {self.busy_with}: stop that root first "
                                "or start another worker")
        self.busy_with = peer

    def _accept_hello(self, hello: Hello) -> Assignment:
        header = hello.header()
        split = ClusterSplit.plan(header, hello.n_nodes, hello.weights)
        share = split.nodes[hello.node_index]
        if not share.computes:
            raise ProtocolError(f"the root gives node {hello.node_index} no share of the model (weight 0): "
                                "give every worker a positive weight")
        if not 1 <= hello.max_seq_len <= header.max_seq_len:
            raise ProtocolError(f"max_seq_len {hello.max_seq_len} is outside 1..{header.max_seq_len} of the model")
        if self.identity is not None and self.identity != hello.identity:
            raise ProtocolError(f"this worker's --model {self.model_path} ({self.identity.short()}) is not the root's "
                                f"model ({hello.identity.short()}): copy the same file or start the worker without "
                                "--model")
        # a local copy's row slices are mapped from the file (page cache); streamed ones are allocated
        need = hello.slots * kv_cache_bytes(header, share, hello.max_seq_len)
        need += node_weight_bytes(header, share) if self.identity is None else 0
        if need > (free := available_memory()):
            raise ProtocolError(f"node {hello.node_index}'s slice and cache need {need >> 20} MiB but this machine has "
                                f"{free >> 20} MiB available: use more nodes or a smaller --max-seq-len")
        return Assignment(hello, header, split)

    def _attach_peer(self, chan: Channel, token: bytes, node: int) -> None:
        chan.deadline = None
        with self.mesh:
            self.mesh_links.setdefault(token, {})[node] = chan
            self.mesh.notify_all()

    def _join_mesh(self, chan: Channel, s: Assignment) -> tuple[dict[int, Channel], bool]:
        """After READY: the root's MESH plan (dial every lower worker, take every higher one's call, say
        whether all were reached), then its EXCHANGE decision; or EXCHANGE(star) at once.
        Returns node -> link of every other worker (empty for the star), and whether the exchange over
        them is the slices one."""
        chan.send_frame(Frame.READY, ready_payload(self.identity is not None))
        kind, payload = chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.MESH, Frame.EXCHANGE))
        if kind == Frame.EXCHANGE:
            return {}, False
        token, addresses = parse_mesh(payload, s.n_nodes - 1)
        links, status, problem = self._mesh_links(token, s, addresses)
        chan.send_frame(Frame.MESH_STATUS, bytes([status]) + problem.encode()[:MAX_ERROR_MESSAGE])
        _, payload = chan.recv_frame(HANDSHAKE_MAX_FRAME, expect=(Frame.EXCHANGE,))
        if payload[:1] not in (bytes([EXCHANGE_MESH]), bytes([EXCHANGE_SLICES])):
            for link in links.values():
                link.close()
            return {}, False
        return links, payload[:1] == bytes([EXCHANGE_SLICES])

    def _mesh_links(self, token: bytes, s: Assignment, addresses: list[tuple[str, int]]
                    ) -> tuple[dict[int, Channel], int, str]:
        """(links, MESH_STATUS code, problem): MESH_OK, MESH_UNREACHABLE (it could not dial a lower
        worker) or MESH_UNCALLED (a higher worker never called)."""
        from dllama.runtime.distributed.root import WorkerLink, open_link

        links: dict[int, Channel] = {}
        deadline = time.monotonic() + MESH_TIMEOUT_S
        status = MESH_UNREACHABLE
        try:
            for node in range(1, s.node):  # dial the lower workers
                link = WorkerLink(node, addresses[node - 1])
                open_link(link, self.key)
                link.chan.send_frame(Frame.PEER, peer_payload(token, s.node))
                link.sock.settimeout(PROGRESS_TIMEOUT_S)  # a busy peer's heartbeat comes every second
                links[node] = link.chan
            status = MESH_UNCALLED
            with self.mesh:  # and wait for the higher ones' calls
                want = set(range(s.node + 1, s.n_nodes))
                while not want <= set(self.mesh_links.get(token, {})):
                    if not self.mesh.wait(max(0.0, deadline - time.monotonic())):
                        missing = sorted(want - set(self.mesh_links.get(token, {})))
                        host, port = addresses[missing[0] - 1]
                        raise ProtocolError(f"worker {host}:{port} (node {missing[0]}) did not call within "
                                            f"{MESH_TIMEOUT_S:.0f} s")
                for node, link in self.mesh_links.pop(token, {}).items():
                    link.settimeout(PROGRESS_TIMEOUT_S)
                    links[node] = link
        except (DllamaError, OSError) as e:
            for link in links.values():
                link.close()
            return {}, status, f"cannot reach {e}"
        return links, MESH_OK, ""

    def _load_slices(self, chan: Channel, s: Assignment) -> dict[str, np.ndarray]:
        local = self.identity is not None
        if local:
            return load_local_slices(self.model_path, s.header, s.share)
        receiver = SliceReceiver(s.header, s.share)
        while True:
            kind, length = chan.recv_header(WEIGHTS_HEAD.size + WEIGHT_CHUNK, expect=(Frame.WEIGHTS,
                                                                                       Frame.WEIGHTS_DONE))
            if kind == Frame.WEIGHTS_DONE:
                chan.recv_exact(length)
                chan.end_frame()
                return receiver.slices()
            receiver.receive(chan, length)

    def _serve_tokens(self, chan: Channel, s: Assignment, engine: Engine, heartbeat: "Heartbeat") -> None:
        limit = s.forward_limit()
        h = s.header
        while True:
            chan.settimeout(None)  # a chat root may think for as long as its user types
            kind, payload = chan.recv_frame(limit, expect=(Frame.FORWARD, Frame.BYE))
            chan.settimeout(IO_TIMEOUT_S)
            if kind == Frame.BYE:
                return
            step = parse_forward(payload, h.dim, MAX_BATCH, s.hello.slots, s.hello.max_seq_len)
            with heartbeat.busy():
                # the exchange sends the partials, then the logits
                engine.run_layers(step.x, Places(step.positions, step.slots), logits=step.rows)


def checked_model(path: Path) -> ModelIdentity:
    """A worker's --model at start-up: readable, a valid header of exactly the file's size, and its
    full-file digest (computed once, then cached beside it)."""
    try:
        ModelFile(path)
        return model_identity(path)
    except OSError as e:
        raise FormatError(f"cannot read --model {path}: {e.strerror or e}") from None


class Heartbeat:
    """While the worker is busy (loading, or inside a forward), a PING whenever it has sent nothing for
    HEARTBEAT_S: the root then takes a silence of PROGRESS_TIMEOUT_S for a frozen worker, however long
    a computation takes. A stopped process stops this thread too, which is the point. Mesh links get
    the same, so that a worker waiting on a frozen peer notices too (and does not stay busy)."""

    def __init__(self, chan: Channel):
        self.chans = [chan]
        self.active = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def watch(self, chans) -> None:
        self.chans = self.chans + list(chans)

    def _run(self) -> None:
        while not self.done.wait(HEARTBEAT_S / 4):
            for chan in self.chans if self.active else ():
                if time.monotonic() - chan.last_send >= HEARTBEAT_S:
                    try:
                        chan.send_frame(Frame.PING)
                    except ProtocolError:
                        return

    def stop(self) -> None:
        self.done.set()


class WorkerExchange:
    """A worker's side of the exchange seams (engine.Exchange): its partial to the root, every other
    computing node's partial from the root, and its logits slice to the root."""

    def __init__(self, chan: Channel, session: Assignment, mesh: dict[int, Channel] | None = None,
                 slices: bool = False):
        """mesh: node -> link of every other worker, for the direct exchange (empty: the star); slices:
        over those links, the slices exchange (exchange.slices_sum)."""
        self.chan, self.s = chan, session
        self.peers = {0: chan, **mesh} if mesh or slices else None
        self.slices = slices

    def begin(self, x: np.ndarray, pos: int, logits: str = "all") -> None:
        pass  # the root sent x

    def reduce_into(self, x: np.ndarray, partial: np.ndarray | None, layer: int, stage: str) -> None:
        """Send this node's partial, then take every other computing node's (or the root's float32 sum of
        all of them, exchange.relays_sums) and add them into x in node order.

        Sending first and receiving after (the root does the opposite) means no two peers ever wait
        on each other's full socket buffers."""
        n, dim = x.shape
        s, seam, bt = self.s, SEAMS[stage], self.s.hello.buffer_type
        computing = s.split.computing
        if self.peers is not None and self.slices:
            x += slices_sum(s.node, partial, self.peers, computing, layer, seam, n, dim, bt)
            return
        own = encode_partial(partial, bt)
        if self.peers is not None:  # the direct exchange: every partial straight from its node
            limit = PARTIAL_HEAD.size + partial_nbytes(n, dim, bt)
            got = mesh_partials(s.node, own, self.peers, computing, layer, seam, limit)
            x += sum_partials([decode_partial(got[i], n, dim, bt) for i in computing])
            return
        self.chan.send_frame(Frame.PARTIAL, PARTIAL_HEAD.pack(layer, seam, s.node), own)
        if relays_sums(len(computing), dim, bt):
            _, payload = self.chan.recv_frame( SUM_HEAD.size + n * dim * 4, expect=(Frame.SUM,))
            x += decode_sum(payload, layer, seam, n, dim)
            return
        parts: dict[int, np.ndarray] = {s.node: decode_partial(own, n, dim, bt)}
        limit = PARTIAL_HEAD.size + partial_nbytes(n, dim, bt)
        while len(parts) < len(computing):
            _, payload = self.chan.recv_frame( limit, expect=(Frame.PARTIAL,))
            sender, data = parse_partial(payload, layer, seam, computing)
            if sender in parts:
                raise ProtocolError(f"second partial from node {sender} at layer {layer}")
            parts[sender] = decode_partial(data, n, dim, bt)
        x += sum_partials([parts[i] for i in computing])

    def gather_logits(self, logits_slice: np.ndarray) -> np.ndarray:
        if len(logits_slice) == 0:  # a prompt batch before its last
            return logits_slice
        self.chan.send_frame(Frame.LOGITS, *encode_logits(logits_slice, self.s.hello.buffer_type))
        return logits_slice


def greet(conn: socket.socket, challenge: bytes) -> None:
    """Our preamble and CHALLENGE, sent the moment a connection is accepted (a small send never blocks)."""
    try:
        conn.sendall(greeting(challenge))
    except OSError:
        pass
