"""The exchange seams on their own (dllama/runtime/distributed/exchange.py): the wire bytes of partials,
sums and logits against the format's reference codecs, the frame checks, and the direct exchange
between nodes over socket pairs. The cluster tests (test_distributed*.py) check the same code end to
end; these fail in milliseconds on the line that is wrong (docs/TESTING.md, "Mutation testing")."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from dllama.formats import dequantize_q80, quantize_q80
from dllama.runtime.distributed.exchange import (
    EARLY_SEND_BYTES,
    PeerFailed,
    decode_logits,
    decode_partial,
    decode_sum,
    encode_logits,
    encode_partial,
    encode_sum,
    joined_columns,
    mesh_partials,
    parse_partial,
    partial_nbytes,
    relays_sums,
    slice_owners,
    slice_ranges,
    sum_partials,
    wire_columns,
)
from dllama.runtime.distributed.protocol import (
    LOGITS_HEAD,
    PARTIAL_HEAD,
    SUM_HEAD,
    BufferType,
    Channel,
    Frame,
    ProtocolError,
)

Q80, F32 = BufferType.Q80, BufferType.F32


def partial(n_tokens: int, dim: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n_tokens, dim)) * 2).astype(np.float32)


def test_partial_sizes_are_q80_blocks_or_float32_values():
    assert partial_nbytes(3, 64, Q80) == 3 * 2 * 34 and partial_nbytes(3, 64, F32) == 3 * 64 * 4


def test_q80_partials_are_the_formats_reference_bytes_and_decode_to_its_values():
    p = partial(3, 96)
    wire = encode_partial(p, Q80)
    assert bytes(wire) == quantize_q80(p).tobytes()
    decoded = decode_partial(wire, 3, 96, Q80)
    assert decoded.shape == (3, 96) and np.array_equal(decoded.reshape(-1), dequantize_q80(quantize_q80(p)))


def test_f32_partials_cross_unchanged():
    p = partial(2, 64)
    wire = encode_partial(p, F32)
    assert len(wire) == p.nbytes
    assert np.array_equal(decode_partial(wire, 2, 64, F32), p)


@pytest.mark.parametrize("buffer_type", [Q80, F32])
def test_a_partial_of_the_wrong_size_is_refused(buffer_type):
    wire = bytes(encode_partial(partial(2, 64), buffer_type))
    with pytest.raises(ProtocolError, match=f"expected {partial_nbytes(2, 64, buffer_type)}"):
        decode_partial(memoryview(wire[:-1]), 2, 64, buffer_type)


def test_a_partial_frame_names_its_sender_and_must_be_for_this_step():
    data = bytes(range(10))
    payload = memoryview(PARTIAL_HEAD.pack(7, 1, 2) + data)
    node, got = parse_partial(payload, 7, 1, [0, 2])
    assert node == 2 and bytes(got) == data
    for layer, seam, computing in ((6, 1, [0, 2]), (7, 0, [0, 2]), (7, 1, [0, 1])):
        with pytest.raises(ProtocolError, match="out of step"):
            parse_partial(payload, layer, seam, computing)
    with pytest.raises(ProtocolError, match="^PARTIAL frame too short$"):
        parse_partial(payload[:PARTIAL_HEAD.size - 1], 7, 1, [0, 2])
    node, got = parse_partial(payload[:PARTIAL_HEAD.size], 7, 1, [0, 2])   # a header alone: its data is empty
    assert node == 2 and len(got) == 0


def test_partials_are_summed_in_float64_and_rounded_once():
    a = np.array([[1.0, 2.0 ** 24]], dtype=np.float32)
    b = np.array([[2.0 ** -30, 1.0]], dtype=np.float32)
    c = np.array([[-1.0, 1.0]], dtype=np.float32)
    total = sum_partials([a, b, c])
    assert total.dtype == np.float32
    # float32 additions in order would give [0, 2^24] (each + 1 is lost on 2^24); float64 keeps them
    assert total.tolist() == [[np.float32(2.0 ** -30), 2.0 ** 24 + 2]]
    assert sum_partials([a]) is a


def test_the_root_relays_sums_exactly_where_they_are_smaller():
    dim = 2048
    # a q80 partial is 34/128 of a float32 sum: 4 other partials (5 nodes) outweigh it, 3 do not
    assert [relays_sums(n, dim, Q80) for n in (2, 3, 4, 5, 6)] == [False, False, False, True, True]
    assert [relays_sums(n, dim, F32) for n in (2, 3, 4)] == [False, True, True]


def test_sums_are_float32_frames_checked_for_their_step_and_size():
    total = partial(2, 32)
    head, data = encode_sum(total, 5, 1)
    assert head == SUM_HEAD.pack(5, 1) and bytes(data) == total.astype("<f4").tobytes()
    payload = memoryview(head + bytes(data))
    assert np.array_equal(decode_sum(payload, 5, 1, 2, 32), total)
    for layer, seam in ((4, 1), (5, 0)):
        with pytest.raises(ProtocolError, match=f"at layer {layer} seam {seam}: the peers are out of step$"):
            decode_sum(payload, layer, seam, 2, 32)
    with pytest.raises(ProtocolError, match="does not hold 2 x 32"):
        decode_sum(payload[:-1], 5, 1, 2, 32)


@pytest.mark.parametrize("buffer_type, dtype", [(Q80, "<f2"), (F32, "<f4")])
def test_logits_go_back_as_f16_with_q80_buffers_and_f32_with_f32(buffer_type, dtype):
    logits = partial(2, 50) * 5
    head, data = encode_logits(logits, buffer_type)
    assert bytes(data) == logits.astype(dtype).tobytes()
    decoded = decode_logits(memoryview(head + bytes(data)), 2, 50)
    assert decoded.dtype == np.float32 and np.array_equal(decoded, logits.astype(dtype).astype(np.float32))
    with pytest.raises(ProtocolError, match="does not hold 2 x 50 values$"):
        decode_logits(memoryview(head + bytes(data)[:-1]), 2, 50)
    none = decode_logits(memoryview(head), 0, 50)   # a batch that gathers no logits
    assert none.shape == (0, 50)


def test_a_logits_frame_of_an_unknown_kind_or_too_short_is_refused():
    with pytest.raises(ProtocolError, match="kind 7"):
        decode_logits(memoryview(LOGITS_HEAD.pack(7) + bytes(8)), 1, 2)
    with pytest.raises(ProtocolError, match="^LOGITS frame too short$"):
        decode_logits(memoryview(b""), 1, 2)


def test_whatever_float_type_a_caller_holds_the_wire_carries_float32():
    values = partial(2, 32).astype(np.float64)
    as_f32 = values.astype(np.float32).tobytes()
    assert bytes(encode_partial(values, F32)) == as_f32
    assert bytes(encode_sum(values, 0, 0)[1]) == as_f32
    assert bytes(encode_logits(values, F32)[1]) == as_f32


def test_a_failing_peer_is_named_with_its_cause():
    with pytest.raises(PeerFailed, match="node 3: gone") as caught:
        with PeerFailed.naming(3):
            raise ProtocolError("gone")
    assert caught.value.node == 3 and str(caught.value.cause) == "gone"
    with pytest.raises(ValueError):   # not a peer's failure
        with PeerFailed.naming(3):
            raise ValueError("a bug")


# -- the direct exchange: every node a thread, every link a socket pair

def mesh(n_nodes: int) -> dict[int, dict[int, Channel]]:
    peers: dict[int, dict[int, Channel]] = {i: {} for i in range(n_nodes)}
    for i in range(n_nodes):
        for j in range(i + 1, n_nodes):
            a, b = socket.socketpair()
            for s in (a, b):
                s.settimeout(10)   # a deadlock fails the test instead of hanging it
            peers[i][j], peers[j][i] = Channel(a), Channel(b)
    return peers


def run_mesh(n_nodes: int, computing: list[int], wires: dict[int, bytes], limit: int) -> dict[int, dict]:
    peers, results, errors = mesh(n_nodes), {}, []

    def node(me: int) -> None:
        try:
            own = memoryview(wires[me]) if me in computing else None
            got = mesh_partials(me, own, peers[me], computing, layer=3, seam=1, limit=limit)
            results[me] = {k: bytes(v) for k, v in got.items()}
        except BaseException as e:   # reported by the test below
            errors.append((me, e))

    threads = [threading.Thread(target=node, args=(me,), daemon=True) for me in range(n_nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == n_nodes
    return results


@pytest.mark.parametrize("size", [64, EARLY_SEND_BYTES, 4 * 1024 * 1024])  # small: all at once; large: pairwise
def test_every_computing_node_gets_every_partial_and_a_coordinator_sends_none(size):
    computing = [1, 2, 3]   # node 0 coordinates: it computes nothing
    wires = {me: bytes([me]) * size for me in computing}
    results = run_mesh(4, computing, wires, limit=size + PARTIAL_HEAD.size)
    for me in range(4):
        assert results[me] == wires


def test_a_peer_that_closed_its_link_is_named_when_sending():
    peers = mesh(3)
    peers[2][0].close()
    with pytest.raises(PeerFailed, match="node 2: ") as caught:
        mesh_partials(0, memoryview(b"x" * 64), peers[0], [0, 1, 2], 3, 1, limit=64 + PARTIAL_HEAD.size)
    assert caught.value.node == 2


def test_a_peer_sending_another_kind_of_frame_is_refused():
    peers = mesh(2)
    peers[1][0].send_frame(Frame.SUM, PARTIAL_HEAD.pack(3, 1, 1), b"x")   # a valid partial's bytes, as a SUM
    with pytest.raises(PeerFailed, match="node 1: .*SUM"):
        mesh_partials(0, None, peers[0], [0, 1], 3, 1, limit=64)


def test_a_peer_sending_another_nodes_partial_is_named():
    peers = mesh(2)
    peers[1][0].send_frame(Frame.PARTIAL, PARTIAL_HEAD.pack(3, 1, 2), b"x")   # node 1 claims node 2's partial
    with pytest.raises(PeerFailed, match="node 1: sent the partial of node 2"):
        mesh_partials(0, None, peers[0], [0, 1, 2], 3, 1, limit=64)


# -- the slices exchange's parts (its threads over socket pairs: test_distributed_mesh.py)

def test_the_computing_workers_sum_the_slices_and_the_root_only_when_it_computes_alone():
    assert slice_owners([0, 1, 2]) == [1, 2]      # the root's link already carries FORWARD and LOGITS
    assert slice_owners([1, 2, 3]) == [1, 2, 3]   # a coordinator root
    assert slice_owners([0]) == [0]


def test_slices_are_contiguous_whole_q80_blocks_or_any_f32_values():
    assert slice_ranges(320, [1, 2, 3], Q80) == {1: (0, 96), 2: (96, 192), 3: (192, 320)}   # 10 blocks: 3, 3, 4
    assert slice_ranges(10, [1, 2, 3], F32) == {1: (0, 3), 2: (3, 6), 3: (6, 10)}
    assert slice_ranges(64, [1, 2, 3], Q80) == {1: (0, 32), 2: (32, 64)}   # 2 blocks: the third owner gets none


@pytest.mark.parametrize("buffer_type", [Q80, F32])
@pytest.mark.parametrize("n_tokens", [1, 2, 3])
def test_a_slice_of_every_tokens_columns_is_their_own_encoding_and_slices_join_back(n_tokens, buffer_type):
    x = partial(n_tokens, 128, seed=n_tokens)
    wire = encode_partial(x, buffer_type)
    cuts = [(0, 32), (32, 96), (96, 128)]
    pieces = [wire_columns(wire, n_tokens, 128, first, stop) for first, stop in cuts]
    for (first, stop), piece in zip(cuts, pieces):
        assert bytes(piece) == bytes(encode_partial(x[:, first:stop], buffer_type)), (first, stop)
    assert bytes(joined_columns(pieces, n_tokens)) == bytes(wire)
