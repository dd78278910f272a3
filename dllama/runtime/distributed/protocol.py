"""The root <-> worker wire protocol (docs/PROTOCOL.md): preamble, typed frames, limits, identity.

Every byte a peer sends is checked against an explicit limit *before* anything is allocated for
it, so a port scanner, a stale root speaking another protocol version or a corrupt stream gets a
one-line ERROR frame and a closed connection, never a crash or a huge allocation.
"""
from __future__ import annotations

import enum
import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from dllama import __version__
from dllama.errors import DllamaError
from dllama.formats import FormatError, ModelHeader, model_file_size, parse_model_header

PROTOCOL_MAGIC = b"DLLM"
PROTOCOL_VERSION = 2  # 2: uneven and weighted splits (HELLO carries the weights), PROBE/INFO
DEFAULT_PORT = 9999

PREAMBLE = struct.Struct("<4sI")           # magic, protocol version; sent by both sides first
FRAME_HEADER = struct.Struct("<IHH")       # payload length, frame type, reserved (0)
HANDSHAKE_MAX_FRAME = 4096                 # HELLO and its answers are tiny; refuse anything larger
MAX_FRAME = 64 * 1024 * 1024               # hard ceiling for any frame after the handshake
WEIGHT_CHUNK = 4 * 1024 * 1024             # bytes of weights per WEIGHTS frame
MAX_ERROR_MESSAGE = 1024
MAX_PLAN_TENSORS = 1 << 20                 # tensors a HELLO's header may describe
SMALL_FRAME = 256 * 1024                   # frames up to this size are copied into one send (send_frames)

CONNECT_TIMEOUT_S = 10.0
# A dllama worker greets the moment it accepts; the root says nothing before that greeting, so a
# peer that stays silent (a reference distributed-llama worker waits for its root's bytes) is told
# apart quickly and never reads our bytes as its own protocol's sizes.
GREETING_TIMEOUT_S = 2.0
HANDSHAKE_TIMEOUT_S = 10.0
# A worker's answer to one FORWARD can take a long prefill batch on a slow board; a dead peer is
# noticed at once anyway (the kernel closes its socket), this only bounds a silent hang.
IO_TIMEOUT_S = 120.0


class ProtocolError(DllamaError, RuntimeError):
    """The peer broke the protocol (or vanished); the message names what and how to fix it."""


class PeerClosed(ProtocolError):
    """The peer closed the connection (a root going away is normal for a worker)."""


class PeerSilent(ProtocolError):
    """The peer sent nothing within the socket's timeout."""


class Frame(enum.IntEnum):
    HELLO = 1         # root -> worker: node assignment, settings, model identity and header
    READY = 2         # worker -> root: whether it loaded its slices from its own copy
    ERROR = 3         # either way: one utf-8 line, then the sender closes
    WEIGHTS = 4       # root -> worker: a chunk of one tensor's slice
    WEIGHTS_DONE = 5  # root -> worker: every slice sent; worker answers LOADED
    LOADED = 6        # worker -> root
    FORWARD = 7       # root -> worker: positions and the input vectors x of a batch
    PARTIAL = 8       # both ways: a node's partial dim vectors after wo or w2 (FORMAT.md §3)
    LOGITS = 9        # worker -> root: its slice of the logits
    BYE = 10          # root -> worker: session over, go back to waiting
    PROBE = 11        # root -> worker, before HELLO: report memory and speed (--weights auto)
    INFO = 12         # worker -> root: the answer to PROBE
    SUM = 13          # root -> worker: the sum of every computing node's partials (float32), instead of them


class BufferType(enum.IntEnum):
    """How partial vectors cross the wire (FORMAT.md §2: q80 buffers quantize each partial)."""

    F32 = 0
    Q80 = 1

    @classmethod
    def parse(cls, name: str) -> "BufferType":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ProtocolError(f"unknown buffer float type {name!r}: use q80 or f32") from None


# --------------------------------------------------------------------------------------------
# Model identity: size + hash of the header and an even sample of the data

IDENTITY_SAMPLES = 64
IDENTITY_SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class ModelIdentity:
    size: int
    digest: bytes  # sha256

    def short(self) -> str:
        return f"{self.size} bytes, sha256 {self.digest.hex()[:12]}"


def model_identity(path: str | os.PathLike) -> ModelIdentity:
    """Cheap fingerprint of a `.m`: reads the header and 64 x 4 KiB spread over the file."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(struct.pack("<Q", size))
    with open(path, "rb") as f:
        head = f.read(8 + 8 * 64)
        h.update(head)
        span = max(size - IDENTITY_SAMPLE_BYTES, 0)
        for i in range(IDENTITY_SAMPLES):
            f.seek(span * i // (IDENTITY_SAMPLES - 1))
            h.update(f.read(IDENTITY_SAMPLE_BYTES))
    return ModelIdentity(size, h.digest())


# --------------------------------------------------------------------------------------------
# Framing

KEEPALIVE_S = (10, 5, 3)  # idle seconds before probing, seconds between probes, probes


def configure_socket(sock: socket.socket, timeout: float | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # per-layer vectors are small and latency-bound
    # a peer whose board lost power sends no FIN: probe, so a worker idling between a chat root's
    # requests notices within ~25 s instead of the system default of two hours
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE_S):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    sock.settimeout(timeout)


def recv_exact(sock: socket.socket, n: int, into: bytearray | memoryview | None = None) -> memoryview:
    buf = memoryview(into) if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        try:
            k = sock.recv_into(buf[got:n], n - got)
        except socket.timeout:
            raise PeerSilent(f"peer sent nothing for {sock.gettimeout():.0f} s") from None
        except OSError as e:
            raise PeerClosed(f"connection lost ({e.strerror or e})") from None
        if k == 0:
            raise PeerClosed("connection closed by the peer")
        got += k
    return buf[:n]


def send_frame(sock: socket.socket, kind: Frame, *parts: bytes | bytearray | memoryview) -> int:
    """Send one frame made of `parts`; returns the bytes put on the wire."""
    length = sum(memoryview(p).nbytes for p in parts)
    if length <= SMALL_FRAME:
        return send_frames(sock, [(kind, parts)])
    if length > MAX_FRAME:
        raise ProtocolError(f"refusing to send a {length}-byte frame: the limit is {MAX_FRAME}")
    _sendall(sock, FRAME_HEADER.pack(length, int(kind), 0), *parts)
    return FRAME_HEADER.size + length


def send_frames(sock: socket.socket, frames: list[tuple[Frame, tuple]]) -> int:
    """Send small frames in a single send: with TCP_NODELAY every send is a packet and a wake-up
    of the peer, and two sends per frame doubled the per-token time on loopback."""
    chunks: list = []
    for kind, parts in frames:
        length = sum(memoryview(p).nbytes for p in parts)
        chunks += [FRAME_HEADER.pack(length, int(kind), 0), *parts]
    data = b"".join(chunks)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"refusing to send {len(data)} bytes at once: the limit is {MAX_FRAME}")
    _sendall(sock, data)
    return len(data)


def _sendall(sock: socket.socket, *chunks) -> None:
    try:
        for c in chunks:
            sock.sendall(c)
    except socket.timeout:
        raise ProtocolError(f"peer accepted nothing for {sock.gettimeout():.0f} s") from None
    except OSError as e:
        raise PeerClosed(f"connection lost ({e.strerror or e})") from None


def recv_header(sock: socket.socket, max_len: int, expect: tuple[Frame, ...] | None = None) -> tuple[Frame, int]:
    """Receive a frame header, refusing unknown types and lengths over `max_len` before allocating.
    An ERROR frame (unless expected) becomes a ProtocolError carrying the peer's message."""
    length, kind, reserved = FRAME_HEADER.unpack(recv_exact(sock, FRAME_HEADER.size))
    try:
        kind = Frame(kind)
    except ValueError:
        raise ProtocolError(f"unknown frame type {kind}: the peer speaks another protocol") from None
    if reserved != 0:
        raise ProtocolError(f"frame header has reserved field {reserved}, expected 0: corrupt stream")
    if kind == Frame.ERROR and (expect is None or Frame.ERROR not in expect):
        message = recv_exact(sock, min(length, MAX_ERROR_MESSAGE))
        raise ProtocolError(bytes(message).decode("utf-8", "replace"))
    if length > max_len:
        raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds the limit of {max_len} bytes")
    if expect is not None and kind not in expect:
        names = " or ".join(e.name for e in expect)
        raise ProtocolError(f"expected {names}, got {kind.name}: the peers are out of step")
    return kind, length


def recv_frame(sock: socket.socket, max_len: int, expect: tuple[Frame, ...] | None = None) -> tuple[Frame, memoryview]:
    """Receive one whole frame (see recv_header for the checks)."""
    kind, length = recv_header(sock, max_len, expect)
    return kind, recv_exact(sock, length)


def send_error(sock: socket.socket, message: str) -> None:
    """Best effort: tell the peer why we are hanging up."""
    try:
        send_frame(sock, Frame.ERROR, message.encode("utf-8")[:MAX_ERROR_MESSAGE])
    except ProtocolError:
        pass


# --------------------------------------------------------------------------------------------
# Preamble: magic + version, exchanged before any frame so that versions never misparse frames

def send_preamble(sock: socket.socket) -> None:
    sock.sendall(PREAMBLE.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION))


def check_greeting(sock: socket.socket, peer: str) -> None:
    """The root's first read: the worker's preamble, which a dllama worker sends the moment it accepts."""
    timeout = sock.gettimeout()
    sock.settimeout(GREETING_TIMEOUT_S)
    try:
        check_preamble(sock, peer)
    except PeerSilent:
        raise ProtocolError(f"accepted the connection but sent no dllama greeting within {GREETING_TIMEOUT_S:.0f} s: "
                            "it is not `dllama-run worker` (a reference distributed-llama worker waits silently for "
                            "its root); start `dllama-run worker` there") from None
    finally:
        sock.settimeout(timeout)


def check_preamble(sock: socket.socket, peer: str) -> None:
    magic, version = PREAMBLE.unpack(recv_exact(sock, PREAMBLE.size))
    if magic != PROTOCOL_MAGIC:
        raise ProtocolError(f"{peer} is not a dllama peer (bad magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{peer} speaks dllama protocol version {version}, this side speaks "
                            f"{PROTOCOL_VERSION} (dllama {__version__}): install the same dllama version on root and "
                            "workers")


# --------------------------------------------------------------------------------------------
# HELLO: what the root tells a worker

_HELLO = struct.Struct("<IIIBxxxQ32sI")  # node_index, n_nodes, max_seq_len, buffer_type, size, digest, header_len
# then the header bytes, then n_nodes float32 weights (the split, dllama/runtime/split.py)


@dataclass(frozen=True)
class Hello:
    node_index: int
    n_nodes: int
    max_seq_len: int
    buffer_type: BufferType
    identity: ModelIdentity
    header_bytes: bytes
    weights: tuple[float, ...]  # one per node, as float32 so both sides compute the same split

    def to_bytes(self) -> bytes:
        return (_HELLO.pack(self.node_index, self.n_nodes, self.max_seq_len, int(self.buffer_type),
                            self.identity.size, self.identity.digest, len(self.header_bytes))
                + self.header_bytes + struct.pack(f"<{self.n_nodes}f", *self.weights))

    @classmethod
    def parse(cls, payload: memoryview) -> "Hello":
        if len(payload) < _HELLO.size:
            raise ProtocolError(f"HELLO of {len(payload)} bytes is too short")
        index, n_nodes, seq_len, buffer_type, size, digest, header_len = _HELLO.unpack_from(payload)
        if len(payload) != _HELLO.size + header_len + 4 * n_nodes:
            raise ProtocolError("HELLO header length and node count do not match its payload")
        header_bytes = bytes(payload[_HELLO.size:_HELLO.size + header_len])
        weights = struct.unpack_from(f"<{n_nodes}f", payload, _HELLO.size + header_len)
        if not 1 <= index < n_nodes:
            raise ProtocolError(f"HELLO assigns node {index} of {n_nodes}: a worker is node 1..n-1")
        try:
            buffer_type = BufferType(buffer_type)
        except ValueError:
            raise ProtocolError(f"HELLO names unknown buffer type {buffer_type}") from None
        return cls(index, n_nodes, seq_len, buffer_type, ModelIdentity(size, digest), header_bytes, weights)

    def header(self) -> ModelHeader:
        try:
            header = parse_model_header(self.header_bytes, where="the root's model header")
        except FormatError as e:
            raise ProtocolError(str(e)) from None
        sizes = (header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads, header.vocab_size)
        # bound the tensor plan before building it: a forged header must not make us loop or allocate
        if min(sizes) <= 0 or header.n_experts < 0 or header.n_layers * (8 + 3 * header.n_experts) > MAX_PLAN_TENSORS:
            raise ProtocolError(f"the root's model header describes an impossible model ({header.n_layers} layers, "
                                f"{header.n_experts} experts, dim {header.dim})")
        if model_file_size(header) != self.identity.size:
            raise ProtocolError("the root's model header does not describe a file of the announced size")
        return header


_READY = struct.Struct("<B")  # 1: slices loaded from the worker's own copy, 0: stream them to me


def ready_payload(has_local_copy: bool) -> bytes:
    return _READY.pack(int(has_local_copy))


def parse_ready(payload: memoryview) -> bool:
    if len(payload) != _READY.size:
        raise ProtocolError("READY payload has the wrong size")
    return bool(_READY.unpack(payload)[0])


def as_float32(weights) -> tuple[float, ...]:
    """Weights exactly as a HELLO carries them (the root splits with these very values)."""
    return struct.unpack(f"<{len(weights)}f", struct.pack(f"<{len(weights)}f", *weights))


_INFO = struct.Struct("<QQd")  # physical memory, available memory (bytes), speed (q40 weights/s)


@dataclass(frozen=True)
class NodeInfo:
    """What a worker reports about itself for --weights auto."""

    memory: int
    available: int
    speed: float

    def to_bytes(self) -> bytes:
        return _INFO.pack(self.memory, self.available, self.speed)

    @classmethod
    def parse(cls, payload: memoryview) -> "NodeInfo":
        if len(payload) != _INFO.size:
            raise ProtocolError("INFO payload has the wrong size")
        memory, available, speed = _INFO.unpack(payload)
        if not speed > 0:
            raise ProtocolError(f"INFO reports a speed of {speed}")
        return cls(memory, available, speed)


# --------------------------------------------------------------------------------------------
# Per-token frames

WEIGHTS_HEAD = struct.Struct("<IQ")   # tensor index in the plan, byte offset inside the node's slice
FORWARD_HEAD = struct.Struct("<II")   # position of the first token, number of tokens
PARTIAL_HEAD = struct.Struct("<HBB")  # layer, seam (0 after wo, 1 after w2), node whose partial this is
LOGITS_HEAD = struct.Struct("<B")     # 0: f32 values, 1: f16 values
SUM_HEAD = struct.Struct("<HB")       # layer, seam

