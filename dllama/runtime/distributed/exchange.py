"""The exchange seams (FORMAT.md §3): partial `dim` vectors and logits on the wire.

Partials are quantized to q80 (the reference's buffer type) or sent as f32; every node adds all
partials of the computing nodes, its own included after the same round trip, in node order, so x
is bit-identical on every node (a coordinator root adds the workers' partials only). Logits go back
as f16 with q80 buffers (their error is far below the q80 partials')
and as f32 with f32 buffers, where results must equal one node's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from dllama.formats import BLOCK_FORMATS, FloatType
from dllama.runtime import dispatch
from dllama.runtime.distributed.protocol import LOGITS_HEAD, PARTIAL_HEAD, SUM_HEAD, BufferType, ProtocolError

SEAMS = {"attention": 0, "ffn": 1}  # engine.Exchange stage -> PARTIAL seam number


def partial_nbytes(n_tokens: int, dim: int, buffer_type: BufferType) -> int:
    ft = FloatType.Q80 if buffer_type == BufferType.Q80 else FloatType.F32
    fmt = BLOCK_FORMATS[ft]
    return n_tokens * dim // fmt.values * fmt.nbytes


def encode_partial(p: np.ndarray, buffer_type: BufferType) -> memoryview:
    """A partial on the wire: q80 blocks (formats.quantize_q80's bytes, by a compiled kernel: numpy's
    took ~40 us, 45 times a token on TinyLlama) or float32."""
    p = np.ascontiguousarray(p, dtype=np.float32)
    if buffer_type == BufferType.Q80:
        wire = np.empty(partial_nbytes(*p.shape, buffer_type), dtype=np.uint8)
        dispatch.q80_encode(p, wire)
        return memoryview(wire)
    return memoryview(p).cast("B")


def decode_partial(data: memoryview, n_tokens: int, dim: int, buffer_type: BufferType) -> np.ndarray:
    if len(data) != partial_nbytes(n_tokens, dim, buffer_type):
        raise ProtocolError(f"partial of {len(data)} bytes, expected {partial_nbytes(n_tokens, dim, buffer_type)}")
    if buffer_type == BufferType.Q80:
        out = np.empty((n_tokens, dim), dtype=np.float32)
        dispatch.q80_decode(np.frombuffer(data, dtype=np.uint8), out)
        return out
    return np.frombuffer(data, dtype="<f4").reshape(n_tokens, dim)


def parse_partial(payload: memoryview, layer: int, seam: int, computing: list[int]) -> tuple[int, memoryview]:
    """(sender, data) of a PARTIAL frame that must be for this layer and seam, from a computing node."""
    if len(payload) < PARTIAL_HEAD.size:
        raise ProtocolError("PARTIAL frame too short")
    got_layer, got_seam, node = PARTIAL_HEAD.unpack_from(payload)
    if (got_layer, got_seam) != (layer, seam) or node not in computing:
        raise ProtocolError(f"PARTIAL for layer {got_layer} seam {got_seam} node {node} while at layer {layer} "
                            f"seam {seam}: the peers are out of step")
    return node, payload[PARTIAL_HEAD.size:]


def sum_partials(partials: list[np.ndarray]) -> np.ndarray:
    """The partials summed in float64 in node order and rounded once: the same bits on every node, and
    as close as float32 gets to the one-node sum (a single partial is returned as it is)."""
    if len(partials) == 1:
        return partials[0]
    total = partials[0].astype(np.float64)
    for p in partials[1:]:
        total += p
    return total.astype(np.float32)


def relays_sums(n_computing: int, dim: int, buffer_type: BufferType) -> bool:
    """Whether the root sends each worker the float32 sum of the partials (SUM) rather than the
    partials it lacks (PARTIAL): the sum is 4 bytes per value, the partials n_computing - 1 times a
    q80 or f32 vector, so the sum wins from 5 computing nodes with q80 and from 3 with f32. Every
    node adds the same float32 sum either way, so x stays bit-identical on every node."""
    return (n_computing - 1) * partial_nbytes(1, dim, buffer_type) > 4 * dim


def encode_sum(total: np.ndarray, layer: int, seam: int) -> tuple[bytes, memoryview]:
    return SUM_HEAD.pack(layer, seam), memoryview(np.ascontiguousarray(total, dtype="<f4")).cast("B")


def decode_sum(payload: memoryview, layer: int, seam: int, n_tokens: int, dim: int) -> np.ndarray:
    if len(payload) != SUM_HEAD.size + n_tokens * dim * 4:
        raise ProtocolError(f"SUM frame of {len(payload)} bytes does not hold {n_tokens} x {dim} float32 values")
    if SUM_HEAD.unpack_from(payload) != (layer, seam):
        raise ProtocolError(f"SUM for layer/seam {SUM_HEAD.unpack_from(payload)} while at layer {layer} seam {seam}: "
                            "the peers are out of step")
    return np.frombuffer(payload[SUM_HEAD.size:], dtype="<f4").reshape(n_tokens, dim)


LOGITS_F32, LOGITS_F16 = 0, 1


def encode_logits(logits: np.ndarray, buffer_type: BufferType) -> tuple[bytes, memoryview]:
    if buffer_type == BufferType.Q80:
        return LOGITS_HEAD.pack(LOGITS_F16), memoryview(np.ascontiguousarray(logits, dtype="<f2")).cast("B")
    return LOGITS_HEAD.pack(LOGITS_F32), memoryview(np.ascontiguousarray(logits, dtype="<f4")).cast("B")


def decode_logits(payload: memoryview, n_tokens: int, width: int) -> np.ndarray:
    if len(payload) < LOGITS_HEAD.size:
        raise ProtocolError("LOGITS frame too short")
    (kind,) = LOGITS_HEAD.unpack_from(payload)
    dtype = {LOGITS_F32: "<f4", LOGITS_F16: "<f2"}.get(kind)
    data = payload[LOGITS_HEAD.size:]
    if dtype is None or len(data) != n_tokens * width * np.dtype(dtype).itemsize:
        raise ProtocolError(f"LOGITS frame of kind {kind} and {len(data)} bytes does not hold {n_tokens} x {width} "
                            "values")
    return np.frombuffer(data, dtype=dtype).reshape(n_tokens, width).astype(np.float32)


EARLY_SEND_BYTES = 16 * 1024  # below the smallest default TCP send buffer: such a frame never blocks its sender


class PeerFailed(ProtocolError):
    """One peer of the direct exchange failed; `node` says which (the root names its worker)."""

    def __init__(self, node: int, cause: BaseException):
        self.node, self.cause = node, cause
        super().__init__(f"node {node}: {cause}")

    @staticmethod
    @contextmanager
    def naming(node: int) -> Iterator[None]:
        try:
            yield
        except (ProtocolError, OSError) as e:
            raise PeerFailed(node, e) from None


def mesh_partials(me: int, own: memoryview | None, peers: dict, computing: list[int], layer: int, seam: int,
                  limit: int) -> dict[int, memoryview]:
    """The direct exchange (issue 30): this node's partial straight to every other node, every other
    computing node's straight from it; returns {node: its partial's bytes} (own included).

    `peers`: node -> protocol.Channel of every other node."""
    outgoing = {node: own for node in peers} if own is not None else {}
    got = swap_frames(me, peers, outgoing, [node for node in peers if node in computing], layer, seam, limit,
                      computing)
    return {me: own, **got} if own is not None else got


def swap_frames(me: int, peers: dict, outgoing: dict[int, memoryview], incoming: list[int], layer: int,
                seam: int, limit: int, senders: list[int]) -> dict[int, memoryview]:
    """One step of a direct exchange: PARTIAL(layer, seam, me) frames with `outgoing[node]` to those
    nodes, one from every node of `incoming`; returns {node: its frame's data}.

    Small frames (every decode step's) go out to all at once, then arrive: one network latency.
    Large ones (a prompt's) go pair by pair in node order, the lower node of a pair sending first, so
    that no two nodes ever both block sending to each other with full socket buffers."""
    from dllama.runtime.distributed.protocol import Frame

    got: dict[int, memoryview] = {}

    def send(node: int) -> None:
        if node in outgoing:
            with PeerFailed.naming(node):
                peers[node].send_frame(Frame.PARTIAL, PARTIAL_HEAD.pack(layer, seam, me), outgoing[node])

    def receive(node: int) -> None:
        if node in incoming:
            with PeerFailed.naming(node):
                _, payload = peers[node].recv_frame(limit, expect=(Frame.PARTIAL,))
                sender, data = parse_partial(payload, layer, seam, senders)
                if sender != node:
                    raise ProtocolError(f"sent the partial of node {sender}")
            got[node] = data

    if limit <= EARLY_SEND_BYTES:
        for node in sorted(peers):
            send(node)
        for node in sorted(peers):
            receive(node)
        return got
    for node in sorted(peers):
        first, then = (send, receive) if me < node else (receive, send)
        first(node)
        then(node)
    return got


# The slices exchange (`--exchange slices`): each computing worker sums one slice of the vector from
# every computing node's partial and sends that sum to every node: two network latencies per seam,
# but each node sends about 2x a partial per seam instead of one to each peer. With q80 buffers the
# slice's sum travels as q80 too (one more rounding than the mesh's); with f32 it is exact.

SUM_SLICE = 2  # added to the seam number of PARTIAL frames that carry a slice's sum


def slice_owners(computing: list[int]) -> list[int]:
    """Who sums a slice: every computing worker (the root's link already carries FORWARD and LOGITS);
    the root only when it computes alone."""
    return [node for node in computing if node != 0] or list(computing)


def slice_ranges(dim: int, owners: list[int], buffer_type: BufferType) -> dict[int, tuple[int, int]]:
    """node -> (first, stop) value of its slice: contiguous, in whole q80 blocks with q80 buffers (owners
    beyond the vector's count of blocks get none)."""
    unit = BLOCK_FORMATS[FloatType.Q80].values if buffer_type == BufferType.Q80 else 1
    units = dim // unit
    owners = owners[:units]
    return {node: (k * units // len(owners) * unit, (k + 1) * units // len(owners) * unit)
            for k, node in enumerate(owners)}


def wire_columns(wire: memoryview, n_tokens: int, dim: int, first: int, stop: int) -> memoryview:
    """Values first..stop of every token of an encoded (T, dim) vector, as their own encoded bytes
    (one token's: a view, no copy)."""
    per_value = len(wire) / (n_tokens * dim)
    start, end = round(first * per_value), round(stop * per_value)
    if n_tokens == 1:
        return wire[start:end]
    rows = np.frombuffer(wire, dtype=np.uint8).reshape(n_tokens, -1)
    return memoryview(np.ascontiguousarray(rows[:, start:end])).cast("B")


def joined_columns(pieces: list[memoryview], n_tokens: int) -> memoryview:
    """wire_columns' inverse: the encoded (T, sum of widths) vector of pieces side by side."""
    if n_tokens == 1:
        return memoryview(b"".join(pieces))
    rows = [np.frombuffer(piece, dtype=np.uint8).reshape(n_tokens, -1) for piece in pieces]
    return memoryview(np.ascontiguousarray(np.concatenate(rows, axis=1))).cast("B")


def slices_sum(me: int, partial: np.ndarray | None, peers: dict, computing: list[int], layer: int, seam: int,
               n_tokens: int, dim: int, buffer_type: BufferType) -> np.ndarray:
    """The slices exchange's sum of every computing node's partial, (T, dim), the same bits on every
    node: each slice is summed in node order (sum_partials) by its owner, encoded once (q80 or f32),
    and every node, its owner included, adds the decoded slice."""
    ranges = slice_ranges(dim, slice_owners(computing), buffer_type)
    owners = list(ranges)
    own = encode_partial(partial, buffer_type) if partial is not None else None
    scattered = {node: wire_columns(own, n_tokens, dim, *ranges[node]) for node in owners if node != me} \
        if own is not None else {}
    limit = PARTIAL_HEAD.size + max(partial_nbytes(n_tokens, stop - first, buffer_type)
                                    for first, stop in ranges.values())
    mine = [node for node in computing if node != me] if me in ranges else []
    got = swap_frames(me, peers, scattered, mine, layer, seam, limit, computing)
    summed: dict[int, memoryview] = {}
    if me in ranges:
        first, stop = ranges[me]
        width = stop - first
        got[me] = wire_columns(own, n_tokens, dim, first, stop)
        # every computing node's slice decoded in one call, then added in node order
        stacked = decode_partial(memoryview(b"".join(got[node] for node in computing)), len(computing) * n_tokens,
                                 width, buffer_type).reshape(len(computing), n_tokens, width)
        wire = encode_partial(sum_partials(list(stacked)), buffer_type)
        summed = {node: wire for node in peers}
    others = [node for node in owners if node != me]
    sums = swap_frames(me, peers, summed, others, layer, seam + SUM_SLICE, limit, owners)
    if me in ranges:
        sums[me] = wire
    return decode_partial(joined_columns([sums[node] for node in owners], n_tokens), n_tokens, dim,
                          buffer_type).reshape(n_tokens, dim)
