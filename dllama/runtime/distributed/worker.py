"""`dllama-run worker`: wait for a root, take a node's share of the model, compute it per token.

The worker runs the root's own layer loop (engine.Engine.run_layers) through a `WorkerExchange`
that talks to the root. One root at a time. Whatever a connection does wrong (garbage, another protocol version, sizes
beyond the limits, a model that does not match `--model`), the worker answers one ERROR line,
closes that connection and goes back to waiting; so does it when the root vanishes.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dllama.formats import ModelFile, ModelHeader
from dllama.runtime import dispatch
from dllama.runtime.distributed.exchange import (
    SEAMS,
    decode_partial,
    decode_sum,
    encode_logits,
    encode_partial,
    parse_partial,
    partial_nbytes,
    relays_sums,
    sum_partials,
)
from dllama.runtime.distributed.node_memory import SplitError, kv_cache_bytes, node_weight_bytes
from dllama.runtime.distributed.probe import node_info, physical_memory
from dllama.runtime.distributed.protocol import (
    FORWARD_HEAD,
    HANDSHAKE_MAX_FRAME,
    HANDSHAKE_TIMEOUT_S,
    IO_TIMEOUT_S,
    PARTIAL_HEAD,
    SUM_HEAD,
    WEIGHT_CHUNK,
    WEIGHTS_HEAD,
    Frame,
    Hello,
    ModelIdentity,
    PeerClosed,
    ProtocolError,
    check_preamble,
    configure_socket,
    model_identity,
    ready_payload,
    recv_exact,
    recv_frame,
    recv_header,
    send_error,
    send_frame,
    send_preamble,
)
from dllama.runtime.distributed.slices import SliceReceiver, load_local_slices
from dllama.runtime.distributed.weights import node_weights
from dllama.runtime.engine import PREFILL_BATCH, Engine, EngineError
from dllama.runtime.model import NodeLayers
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
        return max(FORWARD_HEAD.size + MAX_BATCH * h.dim * 4,
                   PARTIAL_HEAD.size + partial_nbytes(MAX_BATCH, h.dim, self.hello.buffer_type))


class Worker:
    def __init__(self, host: str = "0.0.0.0", port: int = 9999, model_path: str | os.PathLike | None = None,
                 nthreads: int | None = None, log: Callable[[str], None] | None = None):
        if problem := dispatch.threads_problem(nthreads):
            raise EngineError(f"--{problem}")
        dispatch.implementation()  # builds the compiled kernels on a first run, before a root waits for them
        self.model_path = Path(model_path) if model_path else None
        if self.model_path:
            ModelFile(self.model_path)  # a broken copy is refused at start-up, not when a root comes
        self.identity: ModelIdentity | None = model_identity(self.model_path) if self.model_path else None
        self.nthreads = nthreads
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.listener = socket.create_server((host, port), backlog=4)
        self.stop_event = threading.Event()
        self.sessions_served = 0
        self.busy_with: str | None = None  # the root being served
        self.idle = threading.Event()
        self.idle.set()
        self.refused: list[str] = []

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    def serve_forever(self) -> None:
        """Serve one root at a time (in a thread), answering anyone else at once that we are busy."""
        self.log(f"worker listening on {self.address[0]}:{self.address[1]}")
        self.listener.settimeout(0.2)
        try:
            while not self.stop_event.is_set():
                try:
                    conn, addr = self.listener.accept()
                except socket.timeout:
                    continue
                peer = f"{addr[0]}:{addr[1]}"
                greet(conn)  # at once: a root sends nothing before it hears us (docs/PROTOCOL.md)
                busy_with = self.busy_with
                # a root that just vanished may not have been noticed yet: give its session a moment
                if busy_with is not None and not self.idle.wait(1.0):
                    threading.Thread(target=refuse_busy, args=(conn, busy_with), daemon=True).start()
                    continue
                self.busy_with = peer
                self.idle.clear()
                threading.Thread(target=self.serve_connection, args=(conn, peer), daemon=True).start()
        finally:
            self.listener.close()

    def stop(self) -> None:
        self.stop_event.set()

    def serve_connection(self, conn: socket.socket, peer: str) -> None:
        try:
            self._serve(conn, peer)
            self.log(f"root {peer} finished; waiting for the next root")
        except PeerClosed as e:
            self.log(f"root {peer} went away ({e}); waiting for the next root")
        except (ProtocolError, SplitError) as e:
            self.refused.append(str(e))
            self.log(f"refused {peer}: {e}")
            send_error(conn, str(e))
        except Exception as e:  # a bug must not take the board offline: report it and keep serving
            self.refused.append(repr(e))
            self.log(f"internal error serving {peer}: {e!r}")
            send_error(conn, f"worker internal error: {e!r}")
        finally:
            self.sessions_served += 1
            self.busy_with = None  # before the close: a root that sees it may reconnect at once
            self.idle.set()
            conn.close()

    # ----------------------------------------------------------------------------------------
    def _serve(self, conn: socket.socket, peer: str) -> None:
        configure_socket(conn, HANDSHAKE_TIMEOUT_S)
        check_preamble(conn, f"peer {peer}")
        kind, payload = recv_frame(conn, HANDSHAKE_MAX_FRAME, expect=(Frame.HELLO, Frame.PROBE))
        if kind == Frame.PROBE:  # --weights auto: what this board offers, then the HELLO
            send_frame(conn, Frame.INFO, node_info(self.nthreads).to_bytes())
            _, payload = recv_frame(conn, HANDSHAKE_MAX_FRAME, expect=(Frame.HELLO,))
        session = self._accept_hello(Hello.parse(payload))
        self.log(f"root {peer}: node {session.node} of {session.n_nodes} ({session.share.describe()}), "
                 f"{session.hello.identity.short()}")
        conn.settimeout(IO_TIMEOUT_S)
        started = time.perf_counter()
        slices = self._load_slices(conn, session)
        how = f"loaded from {self.model_path}" if self.identity is not None else "received"
        self.log(f"{sum(a.nbytes for a in slices.values()) / 1e6:.0f} MB of slices {how} in "
                 f"{time.perf_counter() - started:.1f} s")
        h, share = session.header, session.share
        layers = NodeLayers(h, node_weights(h, slices, share), share, session.hello.max_seq_len)
        engine = Engine(h, layers, WorkerExchange(conn, session), session.hello.max_seq_len, self.nthreads)
        send_frame(conn, Frame.LOADED)
        if self.nthreads:
            dispatch.set_threads(self.nthreads)  # per calling thread
        self._serve_tokens(conn, session, engine)

    def _accept_hello(self, hello: Hello) -> Assignment:
        header = hello.header()
        split = ClusterSplit.plan(header, hello.n_nodes, hello.weights)
        share = split.nodes[hello.node_index]
        if not share.computes:
            raise ProtocolError(f"the root gives node {hello.node_index} no share of the model (weight 0): "
                                "give every worker a positive weight")
        if not 1 <= hello.max_seq_len <= header.max_seq_len:
            raise ProtocolError(f"max_seq_len {hello.max_seq_len} is outside 1..{header.max_seq_len} of the model")
        need = node_weight_bytes(header, share) + kv_cache_bytes(header, share, hello.max_seq_len)
        if self.identity is None and need > physical_memory():
            raise ProtocolError(f"node {hello.node_index}'s slice and cache need {need >> 20} MiB but this machine has "
                                f"{physical_memory() >> 20} MiB: use more nodes or a smaller --max-seq-len")
        if self.identity is not None and self.identity != hello.identity:
            raise ProtocolError(f"this worker's --model {self.model_path} ({self.identity.short()}) is not the root's "
                                f"model ({hello.identity.short()}): copy the same file or start the worker without "
                                "--model")
        return Assignment(hello, header, split)

    def _load_slices(self, conn: socket.socket, s: Assignment) -> dict[str, np.ndarray]:
        local = self.identity is not None
        send_frame(conn, Frame.READY, ready_payload(local))
        if local:
            return load_local_slices(self.model_path, s.header, s.share)
        receiver = SliceReceiver(s.header, s.share)
        while True:
            kind, length = recv_header(conn, WEIGHTS_HEAD.size + WEIGHT_CHUNK, expect=(Frame.WEIGHTS,
                                                                                       Frame.WEIGHTS_DONE))
            if kind == Frame.WEIGHTS_DONE:
                recv_exact(conn, length)
                return receiver.slices()
            receiver.receive(conn, length)

    def _serve_tokens(self, conn: socket.socket, s: Assignment, engine: Engine) -> None:
        limit = s.forward_limit()
        h = s.header
        while True:
            conn.settimeout(None)  # a chat root may think for as long as its user types
            kind, payload = recv_frame(conn, limit, expect=(Frame.FORWARD, Frame.BYE))
            conn.settimeout(IO_TIMEOUT_S)
            if kind == Frame.BYE:
                return
            if len(payload) < FORWARD_HEAD.size:
                raise ProtocolError("FORWARD frame too short")
            pos, n = FORWARD_HEAD.unpack_from(payload)
            if not 1 <= n <= MAX_BATCH or pos + n > s.hello.max_seq_len:
                raise ProtocolError(f"FORWARD of {n} tokens at position {pos} is outside the batch limit {MAX_BATCH} "
                                    f"or max_seq_len {s.hello.max_seq_len}")
            x_bytes = payload[FORWARD_HEAD.size:]
            if len(x_bytes) != n * h.dim * 4:
                raise ProtocolError(f"FORWARD carries {len(x_bytes)} bytes, expected {n * h.dim * 4}")
            x = np.frombuffer(x_bytes, dtype="<f4").reshape(n, h.dim).copy()
            engine.run_layers(x, pos)  # the exchange sends the partials and, at the end, the logits


class WorkerExchange:
    """A worker's side of the exchange seams (engine.Exchange): its partial to the root, every other
    computing node's partial from the root, and its logits slice to the root."""

    def __init__(self, conn: socket.socket, session: Assignment):
        self.conn, self.s = conn, session

    def begin(self, x: np.ndarray, pos: int) -> None:
        pass  # the root sent x

    def reduce_into(self, x: np.ndarray, partial: np.ndarray | None, layer: int, stage: str) -> None:
        """Send this node's partial, then take every other computing node's (or the root's float32 sum of
        all of them, exchange.relays_sums) and add them into x in node order.

        Sending first and receiving after (the root does the opposite) means no two peers ever wait
        on each other's full socket buffers."""
        n, dim = x.shape
        s, seam, bt = self.s, SEAMS[stage], self.s.hello.buffer_type
        computing = s.split.computing
        own = encode_partial(partial, bt)
        send_frame(self.conn, Frame.PARTIAL, PARTIAL_HEAD.pack(layer, seam, s.node), own)
        if relays_sums(len(computing), dim, bt):
            _, payload = recv_frame(self.conn, SUM_HEAD.size + n * dim * 4, expect=(Frame.SUM,))
            x += decode_sum(payload, layer, seam, n, dim)
            return
        parts: dict[int, np.ndarray] = {s.node: decode_partial(own, n, dim, bt)}
        limit = PARTIAL_HEAD.size + partial_nbytes(n, dim, bt)
        while len(parts) < len(computing):
            _, payload = recv_frame(self.conn, limit, expect=(Frame.PARTIAL,))
            sender, data = parse_partial(payload, layer, seam, computing)
            if sender in parts:
                raise ProtocolError(f"second partial from node {sender} at layer {layer}")
            parts[sender] = decode_partial(data, n, dim, bt)
        x += sum_partials([parts[i] for i in computing])

    def gather_logits(self, logits_slice: np.ndarray) -> np.ndarray:
        send_frame(self.conn, Frame.LOGITS, *encode_logits(logits_slice, self.s.hello.buffer_type))
        return logits_slice


def greet(conn: socket.socket) -> None:
    """Our preamble, sent the moment a connection is accepted (a small send never blocks)."""
    try:
        conn.settimeout(2.0)
        send_preamble(conn)
    except OSError:
        pass


def refuse_busy(conn: socket.socket, current_root: str) -> None:
    try:
        configure_socket(conn, 2.0)
        send_error(conn, f"this worker is busy serving the root at {current_root}: stop that root first "
                         "or start another worker")
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):  # drain what the root sent, so closing does not reset the connection
            pass
    except OSError:
        pass
    finally:
        conn.close()
