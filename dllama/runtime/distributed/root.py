"""The root node: `dllama-run --workers host:port,...`.

`DistributedEngine` offers the single-node Engine's interface (forward(token_ids, pos) -> logits,
reset()), so generation, chat and the API server run unchanged on a cluster. The root computes
node 0's slice itself, looks up the embedding, relays the other nodes' partials to every worker
and gathers the logits.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dllama.formats import ModelFile
from dllama.runtime.distributed.compute import SliceCompute
from dllama.runtime.distributed.exchange import (
    add_partials, decode_logits, decode_partial, encode_partial, parse_partial, partial_nbytes,
)
from dllama.runtime.distributed.plan import split_check
from dllama.runtime.distributed.protocol import (
    CONNECT_TIMEOUT_S, DEFAULT_PORT, FORWARD_HEAD, HANDSHAKE_MAX_FRAME, HANDSHAKE_TIMEOUT_S, IO_TIMEOUT_S,
    LOGITS_HEAD, PARTIAL_HEAD, BufferType, Frame, Hello, ProtocolError, check_preamble, configure_socket,
    model_identity, parse_ready, recv_frame, send_frame, send_preamble,
)
from dllama.runtime.distributed.slices import load_local_slices, node_tensor_names, stream_slices
from dllama.runtime.distributed.worker import MAX_BATCH


class WorkerError(RuntimeError):
    """A worker refused, vanished or broke the protocol; the message names it."""


def parse_workers(text: str) -> list[tuple[str, int]]:
    """'pi1:9999,pi2' -> [('pi1', 9999), ('pi2', 9999)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", str(DEFAULT_PORT))
        try:
            out.append((host.strip("[]"), int(port)))
        except ValueError:
            raise WorkerError(f"cannot read worker address {item!r}: write host:port, e.g. pi1:9999") from None
    return out


@dataclass
class WorkerLink:
    node: int
    address: tuple[str, int]
    sock: socket.socket | None = None
    streamed_bytes: int = 0

    @property
    def name(self) -> str:
        return f"worker {self.address[0]}:{self.address[1]} (node {self.node})"


@dataclass
class Traffic:
    sent: int = 0
    received: int = 0
    tokens: int = 0


class DistributedEngine:
    def __init__(self, model_path: str | os.PathLike, workers: list[tuple[str, int]], max_seq_len: int = 2048,
                 buffer_type: BufferType | str = BufferType.Q80, nthreads: int | None = None,
                 log: Callable[[str], None] | None = None):
        self.model_path = Path(model_path)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.model = ModelFile(self.model_path)
        self.header = h = self.model.header
        self.n_nodes = 1 + len(workers)
        split_check(h, self.n_nodes)
        self.max_seq_len = min(max_seq_len, h.max_seq_len)
        self.buffer_type = BufferType.parse(buffer_type) if isinstance(buffer_type, str) else buffer_type
        self.links = [WorkerLink(i + 1, addr) for i, addr in enumerate(workers)]
        self.traffic = Traffic()
        self.embedding = self.model.blocks("embedding")  # memory-mapped: only looked-up rows are read
        try:
            self._connect_all()
            slices = load_local_slices(self.model_path, h, 0, self.n_nodes, names=node_tensor_names(h, 0) - {"embedding"})
            self.compute = SliceCompute(h, slices, 0, self.n_nodes, self.max_seq_len)
            for link in self.links:
                self._finish_loading(link)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------------
    # start-up
    def _connect_all(self) -> None:
        identity = model_identity(self.model_path)
        for link in self.links:
            hello = Hello(link.node, self.n_nodes, self.max_seq_len, self.buffer_type, identity, self.header.to_bytes())
            with self._blame(link):
                link.sock = socket.create_connection(link.address, timeout=CONNECT_TIMEOUT_S)
                configure_socket(link.sock, HANDSHAKE_TIMEOUT_S)
                send_preamble(link.sock)
                check_preamble(link.sock, link.name)
                send_frame(link.sock, Frame.HELLO, hello.to_bytes())
                _, payload = recv_frame(link.sock, HANDSHAKE_MAX_FRAME, expect=(Frame.READY,))
                link.sock.settimeout(IO_TIMEOUT_S)
                if not parse_ready(payload):
                    self.log(f"streaming node {link.node}'s slices to {link.name}")
                    link.streamed_bytes = stream_slices(link.sock, self.model_path, self.header, link.node, self.n_nodes)
                else:
                    self.log(f"{link.name} loads its slices from its own copy of the model")

    def _finish_loading(self, link: WorkerLink) -> None:
        with self._blame(link):
            recv_frame(link.sock, HANDSHAKE_MAX_FRAME, expect=(Frame.LOADED,))

    class _Blame:
        def __init__(self, link: WorkerLink):
            self.link = link

        def __enter__(self):
            return self

        def __exit__(self, kind, err, tb):
            if isinstance(err, (ProtocolError, OSError)) and not isinstance(err, WorkerError):
                what = err.strerror if isinstance(err, OSError) and err.strerror else str(err) or type(err).__name__
                raise WorkerError(f"{self.link.name}: {what}") from None
            return False

    def _blame(self, link: WorkerLink) -> "_Blame":
        return DistributedEngine._Blame(link)

    # ----------------------------------------------------------------------------------------
    # the Engine interface
    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    def reset(self) -> None:
        self.compute.reset()

    def forward(self, token_ids, pos: int) -> np.ndarray:
        token_ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if pos < 0 or pos + len(token_ids) > self.max_seq_len:
            raise ValueError(f"positions {pos}..{pos + len(token_ids) - 1} exceed max_seq_len {self.max_seq_len}")
        if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= self.header.vocab_size):
            raise ValueError(f"token id outside the vocabulary of {self.header.vocab_size}")
        out = [self._forward_batch(token_ids[i:i + MAX_BATCH], pos + i) for i in range(0, len(token_ids), MAX_BATCH)]
        return np.concatenate(out, axis=0) if out else np.zeros((0, self.vocab_size), np.float32)

    def _forward_batch(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        x = np.array(self.embedding[tokens], dtype=np.float32)
        n = len(tokens)
        for link in self.links:
            self._send(link, Frame.FORWARD, FORWARD_HEAD.pack(pos, n), memoryview(x).cast("B"))
        for layer in range(self.header.n_layers):
            for seam in (0, 1):
                p = self.compute.attention(layer, x, pos) if seam == 0 else self.compute.ffn(layer, x)
                add_partials(x, self._exchange(layer, seam, p))
        width = self.header.vocab_size // self.n_nodes
        logits = [self.compute.logits(x)]
        for link in self.links:
            payload = self._recv(link, Frame.LOGITS, LOGITS_HEAD.size + n * width * 4)
            with self._blame(link):
                logits.append(decode_logits(payload, n, width))
        self.traffic.tokens += n
        return np.concatenate(logits, axis=1)

    def _exchange(self, layer: int, seam: int, own: np.ndarray) -> list[np.ndarray]:
        """Receive every worker's partial, then send each worker all the partials it lacks."""
        n, dim = own.shape
        wire = {0: encode_partial(own, self.buffer_type)}
        limit = PARTIAL_HEAD.size + partial_nbytes(n, dim, self.buffer_type)
        for link in self.links:
            payload = self._recv(link, Frame.PARTIAL, limit)
            with self._blame(link):
                sender, data = parse_partial(payload, layer, seam, self.n_nodes)
                if sender != link.node:
                    raise ProtocolError(f"sent the partial of node {sender}")
            wire[sender] = data
        for link in self.links:
            for node in range(self.n_nodes):
                if node != link.node:
                    self._send(link, Frame.PARTIAL, PARTIAL_HEAD.pack(layer, seam, node), wire[node])
        return [decode_partial(wire[i], n, dim, self.buffer_type) for i in range(self.n_nodes)]

    def _send(self, link: WorkerLink, kind: Frame, *parts) -> None:
        with self._blame(link):
            self.traffic.sent += send_frame(link.sock, kind, *parts)

    def _recv(self, link: WorkerLink, kind: Frame, limit: int) -> memoryview:
        with self._blame(link):
            _, payload = recv_frame(link.sock, limit, expect=(kind,))
        self.traffic.received += 8 + len(payload)
        return payload

    def close(self) -> None:
        for link in self.links:
            if link.sock is not None:
                try:
                    link.sock.settimeout(1.0)
                    send_frame(link.sock, Frame.BYE)
                except (ProtocolError, OSError):
                    pass
                link.sock.close()
                link.sock = None

    def __enter__(self) -> "DistributedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


