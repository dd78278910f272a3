"""The root <-> worker wire protocol (docs/PROTOCOL.md): preamble, typed frames, limits, identity.

Every byte a peer sends is checked against an explicit limit *before* anything is allocated for
it, so a port scanner, a stale root speaking another protocol version or a corrupt stream gets a
one-line ERROR frame and a closed connection, never a crash or a huge allocation.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dllama import __version__
from dllama.errors import DllamaError
from dllama.formats import FormatError, ModelHeader, model_file_size, parse_model_header
from dllama.runtime.distributed.auth import NONCE_BYTES, PROOF_BYTES, SMALL_FRAME, TAG_BYTES, FrameMac

PROTOCOL_MAGIC = b"DLLM"
# 2: uneven and weighted splits (HELLO carries the weights), PROBE/INFO
# 3: the cluster key (CHALLENGE/AUTH/AUTH_OK, a MAC on every frame), full-file model digests, PING
# 4: ChaCha20-Poly1305 frame tags
# 5: steps of several sequences: HELLO carries the KV cache slots, FORWARD every token's slot and position
PROTOCOL_VERSION = 5
DEFAULT_PORT = 9999

PREAMBLE = struct.Struct("<4sI")           # magic, protocol version; sent by both sides first
FRAME_HEADER = struct.Struct("<IHH")       # payload length, frame type, reserved (0)
HANDSHAKE_MAX_FRAME = 4096                 # HELLO and its answers are tiny; refuse anything larger
RECV_BUFFER = 64 * 1024                   # one read takes up to this much of what has arrived
MAX_FRAME = 64 * 1024 * 1024               # hard ceiling for any frame after the handshake
WEIGHT_CHUNK = 4 * 1024 * 1024             # bytes of weights per WEIGHTS frame
MAX_ERROR_MESSAGE = 1024
MAX_PLAN_TENSORS = 1 << 20                 # tensors a HELLO's header may describe
MAX_SLOTS = 64                             # KV cache slots (sequences at once) a HELLO may ask for

CONNECT_TIMEOUT_S = 10.0
# A dllama worker greets the moment it accepts; the root says nothing before that greeting, so a
# peer that stays silent (a reference distributed-llama worker waits for its root's bytes) is told
# apart quickly and never reads our bytes as its own protocol's sizes.
GREETING_TIMEOUT_S = 2.0
HANDSHAKE_TIMEOUT_S = 10.0
# A worker gives a connection this long, from accept to an accepted HELLO, however slowly its bytes
# come: a stranger's idle or dribbling connection ends then (and never holds the worker meanwhile).
HANDSHAKE_DEADLINE_S = 5.0
# A worker waits this long for the root inside a forward (the root may compute a long prefill batch
# of its own); a dead peer is noticed at once anyway (the kernel closes its socket).
IO_TIMEOUT_S = 120.0
# A busy worker (loading its slices, or inside a forward) sends a PING whenever it has sent nothing
# for HEARTBEAT_S, so the root names a worker that sent nothing for PROGRESS_TIMEOUT_S as frozen
# (SIGSTOP, swapping, a hung board) however long its computation takes.
HEARTBEAT_S = 1.0
PROGRESS_TIMEOUT_S = 6.0
# A worker told to join the mesh gets this long to reach every other worker (and be reached)
MESH_TIMEOUT_S = 5.0


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
    CHALLENGE = 14    # worker -> root, right after its preamble: whether it needs the cluster key, its nonce
    AUTH = 15         # root -> worker: the root's nonce and its proof of the key
    AUTH_OK = 16      # worker -> root: the worker's proof of the key; frames carry a MAC from here on
    PING = 17         # worker -> root: "still computing" while busy (skipped by every read)
    MESH = 18         # root -> worker, after READY: the session token and every worker's address (direct exchange)
    MESH_STATUS = 19  # worker -> root: whether it reached every other worker (1), or why not
    EXCHANGE = 20     # root -> worker: how partials travel from now on, 0 the star, 1 direct (the mesh)
    PEER = 21         # worker -> worker, first frame of a mesh link: the session token and the dialling node


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
# Model identity: size + a digest of every byte, computed once per file and cached

DIGEST_CHUNK = 1 << 20
DIGEST_CACHE_MIN_BYTES = 64 << 20  # smaller files hash in well under a second: no cache record for them


@dataclass(frozen=True)
class ModelIdentity:
    size: int
    digest: bytes  # blake2b-256 of the whole file (fast where boards lack SHA instructions)

    def short(self) -> str:
        return f"{self.size} bytes, blake2b {self.digest.hex()[:12]}"


def model_identity(path: str | os.PathLike) -> ModelIdentity:
    """The `.m`'s size and full-file digest: a copy that differs in one byte anywhere differs here.
    Hashing a board's model takes seconds, so the digest of a file of 64 MiB or more is cached
    ($DLLAMA_CACHE/digests, one record per file path), valid while the file keeps its size, inode
    and modification time."""
    path = Path(path)
    st = path.stat()
    key = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    cache = digest_cache(key["path"]) if st.st_size >= DIGEST_CACHE_MIN_BYTES else None
    if cache is not None and (digest := _cached_digest(cache, key)) is not None:
        return ModelIdentity(st.st_size, digest)
    h = hashlib.blake2b(digest_size=32)
    buf = bytearray(DIGEST_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    identity = ModelIdentity(st.st_size, h.digest())
    if cache is not None:
        _save_digest(cache, dict(key, blake2b=identity.digest.hex()))
    return identity


def _cached_digest(cache: Path, key: dict) -> bytes | None:
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key:
            return bytes.fromhex(cached["blake2b"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no record, or a broken one
        pass
    return None


def digest_cache(resolved_path: str) -> Path:
    from dllama.runtime.aot_kernels import cache_root

    return cache_root() / "digests" / (hashlib.sha256(resolved_path.encode()).hexdigest()[:32] + ".json")


def _save_digest(cache: Path, record: dict) -> None:
    from dllama.formats import atomic_output

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache) as f:
            f.write(json.dumps(record).encode())
    except (OSError, FormatError):
        pass  # an unwritable cache: the next start hashes again


# --------------------------------------------------------------------------------------------
# Framing: one Channel per connection (frames, their authentication, deadlines)

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


AUTH_FAILED = ("a frame failed authentication (changed on the way, or not from the peer that proved the cluster "
               "key): the connection is closed")


class Channel:
    """A connection's frames. Once `authenticate` has set a FrameMac per direction, every frame
    carries a TAG_BYTES HMAC after its payload (docs/PROTOCOL.md "Frames"); a `deadline`
    (time.monotonic) bounds every read however slowly the peer dribbles bytes; PING frames
    (a busy worker's heartbeat) are skipped by every read, so a silence is a frozen peer."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.send_mac: FrameMac | None = None
        self.recv_mac: FrameMac | None = None
        self.deadline: float | None = None
        self.send_lock = threading.Lock()  # a worker's heartbeat thread sends too
        self.last_send = time.monotonic()
        self._reading = None  # the running MAC of the frame being received
        self._pending = memoryview(bytearray(RECV_BUFFER))  # bytes read beyond the frame being received:
        self._head = self._tail = 0                          # _pending[_head:_tail]

    def authenticate(self, send_mac: FrameMac, recv_mac: FrameMac) -> None:
        self.send_mac, self.recv_mac = send_mac, recv_mac

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    # -- receiving
    def recv_exact(self, n: int, into: bytearray | memoryview | None = None) -> memoryview:
        """n bytes of the current frame's payload (into `into`), counted into its MAC."""
        data = self._recv_raw(n, into)
        if self._reading is not None:
            self._reading.update(data)
        return data

    def _recv_raw(self, n: int, into=None) -> memoryview:
        """n bytes off the wire: first what the last read brought beyond its frame, then one read per
        arrival, so a header and the payload (and the next frames) that came together cost one call."""
        out = memoryview(into) if into is not None else memoryview(bytearray(n))
        got = min(n, self._tail - self._head)
        if got:
            out[:got] = self._pending[self._head:self._head + got]
            self._head += got
        while got < n:
            if n - got >= RECV_BUFFER:  # a weight chunk: straight into place
                got += self._recv_some(out[got:n])
                continue
            arrived = self._recv_some(self._pending)
            take = min(arrived, n - got)
            out[got:got + take] = self._pending[:take]
            self._head, self._tail = take, arrived
            got += take
        return out[:n]

    def _recv_some(self, into: memoryview) -> int:
        sock = self.sock
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise PeerSilent("the handshake did not finish in time")
            sock.settimeout(left)
        try:
            k = sock.recv_into(into)
        except socket.timeout:
            if self.deadline is not None:
                raise PeerSilent("the handshake did not finish in time") from None
            raise PeerSilent(f"sent nothing for {sock.gettimeout():.0f} s") from None
        except OSError as e:
            raise PeerClosed(f"connection lost ({e.strerror or e})") from None
        if k == 0:
            raise PeerClosed("connection closed by the peer")
        return k

    def end_frame(self) -> None:
        """After the last payload byte: read and check the frame's MAC."""
        if self._reading is None:
            return
        want, self._reading = self._reading.digest(), None
        if not hmac.compare_digest(want, bytes(self._recv_raw(TAG_BYTES))):
            raise ProtocolError(AUTH_FAILED)

    def recv_header(self, max_len: int, expect: tuple[Frame, ...] | None = None) -> tuple[Frame, int]:
        """Receive a frame header, refusing unknown types and lengths over `max_len` before allocating.
        An ERROR frame (unless expected) becomes a ProtocolError carrying the peer's message."""
        while True:
            head = bytes(self._recv_raw(FRAME_HEADER.size))
            length, kind, reserved = FRAME_HEADER.unpack(head)
            if self.recv_mac is not None:
                self._reading = self.recv_mac.start(head, length)
            if kind == Frame.PING and length == 0:
                self.end_frame()
                continue
            break
        try:
            kind = Frame(kind)
        except ValueError:
            raise ProtocolError(f"unknown frame type {kind}: the peer speaks another protocol") from None
        if reserved != 0:
            raise ProtocolError(f"frame header has reserved field {reserved}, expected 0: corrupt stream")
        if kind == Frame.ERROR and (expect is None or Frame.ERROR not in expect):
            message = bytes(self.recv_exact(min(length, MAX_ERROR_MESSAGE)))
            if length <= MAX_ERROR_MESSAGE:
                self.end_frame()
            raise ProtocolError(message.decode("utf-8", "replace"))
        if length > max_len:
            raise ProtocolError(f"{kind.name} frame of {length} bytes exceeds the limit of {max_len} bytes")
        if expect is not None and kind not in expect:
            names = " or ".join(e.name for e in expect)
            raise ProtocolError(f"expected {names}, got {kind.name}: the peers are out of step")
        return kind, length

    def recv_frame(self, max_len: int, expect: tuple[Frame, ...] | None = None) -> tuple[Frame, memoryview]:
        """Receive one whole frame (see recv_header for the checks); payload and MAC in one read."""
        kind, length = self.recv_header(max_len, expect)
        if self._reading is None:
            return kind, self._recv_raw(length)
        data = self._recv_raw(length + TAG_BYTES)
        payload, h, self._reading = data[:length], self._reading, None
        h.update(payload)
        if not hmac.compare_digest(h.digest(), data[length:]):
            raise ProtocolError(AUTH_FAILED)
        return kind, payload

    # -- sending
    def send_frame(self, kind: Frame, *parts: bytes | bytearray | memoryview) -> int:
        """Send one frame made of `parts`; returns the bytes put on the wire."""
        length = sum(memoryview(p).nbytes for p in parts)
        if length <= SMALL_FRAME:
            return self.send_frames([(kind, parts)])
        if length > MAX_FRAME:
            raise ProtocolError(f"refusing to send a {length}-byte frame: the limit is {MAX_FRAME}")
        head = FRAME_HEADER.pack(length, int(kind), 0)
        with self.send_lock:
            chunks = [head, *parts]
            if self.send_mac is not None:
                chunks.append(self.send_mac.tag(head, parts, length))
            self._sendall(*chunks)
        return len(head) + length + (TAG_BYTES if self.send_mac is not None else 0)

    def send_frames(self, frames: list[tuple[Frame, tuple]]) -> int:
        """Send small frames in a single send: with TCP_NODELAY every send is a packet and a wake-up
        of the peer, and two sends per frame doubled the per-token time on loopback."""
        chunks: list = []
        with self.send_lock:
            for kind, parts in frames:
                length = sum(memoryview(p).nbytes for p in parts)
                head = FRAME_HEADER.pack(length, int(kind), 0)
                chunks += [head, *parts]
                if self.send_mac is not None:
                    chunks.append(self.send_mac.tag(head, parts, length))
            data = b"".join(chunks)
            if len(data) > MAX_FRAME:
                raise ProtocolError(f"refusing to send {len(data)} bytes at once: the limit is {MAX_FRAME}")
            self._sendall(data)
        return len(data)

    def _sendall(self, *chunks) -> None:
        try:
            for c in chunks:
                self.sock.sendall(c)
        except socket.timeout:
            raise ProtocolError(f"peer accepted nothing for {self.sock.gettimeout():.0f} s") from None
        except OSError as e:
            raise PeerClosed(f"connection lost ({e.strerror or e})") from None
        self.last_send = time.monotonic()

    def send_error(self, message: str) -> None:
        """Best effort: tell the peer why we are hanging up."""
        try:
            self.send_frame(Frame.ERROR, message.encode("utf-8")[:MAX_ERROR_MESSAGE])
        except ProtocolError:
            pass


# --------------------------------------------------------------------------------------------
# Preamble: magic + version, exchanged before any frame so that versions never misparse frames

def send_preamble(sock: socket.socket, *frames: tuple[Frame, bytes]) -> None:
    """Our preamble, and the unauthenticated handshake frames that follow it, in one send."""
    sock.sendall(PREAMBLE.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION)
                 + b"".join(FRAME_HEADER.pack(len(p), int(k), 0) + p for k, p in frames))


def greeting(challenge: bytes) -> bytes:
    """What a worker sends the moment it accepts: its preamble and CHALLENGE."""
    return (PREAMBLE.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION)
            + FRAME_HEADER.pack(len(challenge), int(Frame.CHALLENGE), 0) + challenge)


def check_greeting(chan: Channel, peer: str) -> None:
    """The root's first read: the worker's preamble, which a dllama worker sends the moment it accepts."""
    timeout = chan.sock.gettimeout()
    chan.settimeout(GREETING_TIMEOUT_S)
    try:
        check_preamble(chan, peer)
    except PeerSilent:
        raise ProtocolError(f"accepted the connection but sent no dllama greeting within {GREETING_TIMEOUT_S:.0f} s: "
                            "it is not `dllama-run worker` (a reference distributed-llama worker waits silently for "
                            "its root); start `dllama-run worker` there") from None
    finally:
        chan.settimeout(timeout)


def check_preamble(chan: Channel, peer: str) -> None:
    magic, version = PREAMBLE.unpack(chan.recv_exact(PREAMBLE.size))
    if magic != PROTOCOL_MAGIC:
        raise ProtocolError(f"{peer} is not a dllama peer (bad magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{peer} speaks dllama protocol version {version}, this side speaks "
                            f"{PROTOCOL_VERSION} (dllama {__version__}): install the same dllama version on root and "
                            "workers")


# --------------------------------------------------------------------------------------------
# Authentication (auth.py holds the key and the proofs; these are their frames)

_CHALLENGE = struct.Struct(f"<B{NONCE_BYTES}s")             # 1: this worker needs the cluster key; its nonce
_AUTH = struct.Struct(f"<{NONCE_BYTES}s{PROOF_BYTES}s")     # the root's nonce, its proof (zeros without a key)
_AUTH_OK = struct.Struct(f"<{PROOF_BYTES}s")                # the worker's proof (zeros without a key)


def challenge_payload(needs_key: bool, nonce: bytes) -> bytes:
    return _CHALLENGE.pack(int(needs_key), nonce)


def parse_challenge(payload: memoryview) -> tuple[bool, bytes]:
    if len(payload) != _CHALLENGE.size:
        raise ProtocolError("CHALLENGE payload has the wrong size")
    needs_key, nonce = _CHALLENGE.unpack(payload)
    return bool(needs_key), nonce


def auth_payload(nonce: bytes, proof: bytes) -> bytes:
    return _AUTH.pack(nonce, proof)


def parse_auth(payload: memoryview) -> tuple[bytes, bytes]:
    if len(payload) != _AUTH.size:
        raise ProtocolError("AUTH payload has the wrong size")
    return _AUTH.unpack(payload)


def auth_ok_payload(proof: bytes) -> bytes:
    return _AUTH_OK.pack(proof)


def parse_auth_ok(payload: memoryview) -> bytes:
    if len(payload) != _AUTH_OK.size:
        raise ProtocolError("AUTH_OK payload has the wrong size")
    return _AUTH_OK.unpack(payload)[0]

# --------------------------------------------------------------------------------------------
# HELLO: what the root tells a worker

_HELLO = struct.Struct("<IIIIBxxxQ32sI")  # node_index, n_nodes, max_seq_len, slots, buffer_type, size, digest,
# header_len; then the header bytes, then n_nodes float32 weights (the split, dllama/runtime/split.py)


@dataclass(frozen=True)
class Hello:
    node_index: int
    n_nodes: int
    max_seq_len: int
    buffer_type: BufferType
    identity: ModelIdentity
    header_bytes: bytes
    weights: tuple[float, ...]  # one per node, as float32 so both sides compute the same split
    slots: int = 1              # KV cache slots of max_seq_len positions each: sequences a step may carry

    def to_bytes(self) -> bytes:
        return (_HELLO.pack(self.node_index, self.n_nodes, self.max_seq_len, self.slots, int(self.buffer_type),
                            self.identity.size, self.identity.digest, len(self.header_bytes))
                + self.header_bytes + struct.pack(f"<{self.n_nodes}f", *self.weights))

    @classmethod
    def parse(cls, payload: memoryview) -> "Hello":
        if len(payload) < _HELLO.size:
            raise ProtocolError(f"HELLO of {len(payload)} bytes is too short")
        index, n_nodes, seq_len, slots, buffer_type, size, digest, header_len = _HELLO.unpack_from(payload)
        if len(payload) != _HELLO.size + header_len + 4 * n_nodes:
            raise ProtocolError("HELLO header length and node count do not match its payload")
        header_bytes = bytes(payload[_HELLO.size:_HELLO.size + header_len])
        weights = struct.unpack_from(f"<{n_nodes}f", payload, _HELLO.size + header_len)
        if not 1 <= index < n_nodes:
            raise ProtocolError(f"HELLO assigns node {index} of {n_nodes}: a worker is node 1..n-1")
        if not 1 <= slots <= MAX_SLOTS:
            raise ProtocolError(f"HELLO asks for {slots} KV cache slots, outside 1..{MAX_SLOTS}")
        try:
            buffer_type = BufferType(buffer_type)
        except ValueError:
            raise ProtocolError(f"HELLO names unknown buffer type {buffer_type}") from None
        return cls(index, n_nodes, seq_len, buffer_type, ModelIdentity(size, digest), header_bytes, weights, slots)

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


# --------------------------------------------------------------------------------------------
# The direct exchange (issue 30): the root's plan of the mesh, and a mesh link's first frame

MESH_TOKEN_BYTES = 32
EXCHANGE_STAR, EXCHANGE_MESH, EXCHANGE_SLICES = 0, 1, 2  # EXCHANGE: slices runs over the mesh's links
MESH_UNREACHABLE, MESH_OK, MESH_UNCALLED = 0, 1, 2  # MESH_STATUS: could not dial a peer, all linked, not called
_PEER = struct.Struct(f"<{MESH_TOKEN_BYTES}sI")  # the session's token, the dialling worker's node


def mesh_payload(token: bytes, addresses: list[tuple[str, int]]) -> bytes:
    """MESH: the token, then "host:port" of nodes 1..n-1 (as the root reached them), one per line."""
    return token + "\n".join(f"{host}:{port}" for host, port in addresses).encode()


def parse_mesh(payload: memoryview, n_workers: int) -> tuple[bytes, list[tuple[str, int]]]:
    token, text = bytes(payload[:MESH_TOKEN_BYTES]), bytes(payload[MESH_TOKEN_BYTES:])
    try:
        items = [line.rpartition(":") for line in text.decode().split("\n")]
        addresses = [(host.strip("[]"), int(port)) for host, _, port in items]
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("MESH frame does not hold host:port lines") from None
    if len(token) != MESH_TOKEN_BYTES or len(addresses) != n_workers:
        raise ProtocolError(f"MESH frame names {len(addresses)} workers, the HELLO {n_workers}")
    return token, addresses


def peer_payload(token: bytes, node: int) -> bytes:
    return _PEER.pack(token, node)


def parse_peer(payload: memoryview) -> tuple[bytes, int]:
    if len(payload) != _PEER.size:
        raise ProtocolError("PEER payload has the wrong size")
    return _PEER.unpack(payload)


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
FORWARD_HEAD = struct.Struct("<II")  # tokens T, logits rows R (the last R tokens'); then T slots, T positions, x
PARTIAL_HEAD = struct.Struct("<HBB")  # layer, seam (0 after wo, 1 after w2), node whose partial this is
LOGITS_HEAD = struct.Struct("<B")     # 0: f32 values, 1: f16 values
SUM_HEAD = struct.Struct("<HB")       # layer, seam



def forward_parts(x: np.ndarray, slots: np.ndarray, positions: np.ndarray, rows: int) -> tuple:
    """A FORWARD's payload: a step's T tokens, each at its own KV cache slot and position (one sequence's batch
    is one slot's consecutive positions), the last `rows` of which want their logits; x (T, dim) float32."""
    places = np.concatenate([slots, positions]).astype("<u4")
    return (FORWARD_HEAD.pack(len(x), rows), memoryview(places).cast("B"),
            memoryview(np.ascontiguousarray(x, dtype="<f4")).cast("B"))


@dataclass(frozen=True)
class Forward:
    slots: np.ndarray      # (T,) int64
    positions: np.ndarray  # (T,) int64
    rows: int              # the last `rows` tokens' logits are gathered
    x: np.ndarray          # (T, dim) float32, writable


def forward_limit(max_batch: int, dim: int) -> int:
    """The largest FORWARD payload of a batch of max_batch tokens."""
    return FORWARD_HEAD.size + max_batch * (8 + dim * 4)


def parse_forward(payload: memoryview, dim: int, max_batch: int, n_slots: int, max_seq_len: int) -> Forward:
    """A FORWARD checked against the session: every token in a slot and at a position its KV cache has."""
    if len(payload) < FORWARD_HEAD.size:
        raise ProtocolError("FORWARD frame too short")
    n, rows = FORWARD_HEAD.unpack_from(payload)
    if not 1 <= n <= max_batch or rows > n:
        raise ProtocolError(f"FORWARD of {n} tokens ({rows} with logits) is outside the batch limit {max_batch}")
    if len(payload) != FORWARD_HEAD.size + n * (8 + dim * 4):
        raise ProtocolError(f"FORWARD carries {len(payload)} bytes, expected {FORWARD_HEAD.size + n * (8 + dim * 4)}")
    places = np.frombuffer(payload, dtype="<u4", count=2 * n, offset=FORWARD_HEAD.size).astype(np.int64)
    slots, positions = places[:n], places[n:]
    if slots.max() >= n_slots or positions.max() >= max_seq_len:
        raise ProtocolError(f"FORWARD puts a token in slot {int(slots.max())} or at position {int(positions.max())}: "
                            f"outside the session's {n_slots} slots of max_seq_len {max_seq_len}")
    x = np.frombuffer(payload, dtype="<f4", offset=FORWARD_HEAD.size + 8 * n).reshape(n, dim).copy()
    return Forward(slots, positions, rows, x)
