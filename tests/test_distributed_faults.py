"""Faults (issue 6, must-hold 2): bad peers are refused without harm, lost peers are named fast."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures
from distributed_helpers import F32_CLUSTER_TOLERANCE, loopback_workers, write_random_model

from dllama import __version__
from dllama.formats import FloatType
from dllama.runtime.distributed.protocol import (
    FORWARD_HEAD,
    FRAME_HEADER,
    PREAMBLE,
    PROTOCOL_MAGIC,
    PROTOCOL_VERSION,
    WEIGHTS_HEAD,
    BufferType,
    Frame,
    Hello,
    ModelIdentity,
    forward_parts,
    model_identity,
)
from dllama.runtime.distributed.root import DistributedEngine, WorkerError


@pytest.fixture
def f32_model():
    return require_fixtures(CONFORMANCE / "tiny-llama") / "expected_f32.m"


def talk(address, *chunks: bytes) -> bytes:
    """Connect, send raw bytes, return whatever the worker says before it hangs up."""
    with socket.create_connection(address, timeout=5) as s:
        try:
            for c in chunks:
                s.sendall(c)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the worker may hang up before reading all we send: its answer is what counts
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def frames(reply: bytes) -> dict[Frame, bytes]:
    """The payloads of the (unauthenticated) frames a worker sent after its preamble, by type."""
    out, at = {}, PREAMBLE.size
    while at + FRAME_HEADER.size <= len(reply):
        length, kind, _ = FRAME_HEADER.unpack_from(reply, at)
        at += FRAME_HEADER.size
        out[Frame(kind)] = reply[at:at + length]
        at += length
    return out


def error_text(reply: bytes) -> str:
    """The worker's ERROR frame (after its preamble, its CHALLENGE and perhaps its AUTH_OK)."""
    return frames(reply)[Frame.ERROR].decode()


def still_serves(worker, model) -> None:
    ids = np.array([1, 5, 9])
    with DistributedEngine(model, [worker.address], max_seq_len=32, buffer_type="f32") as two, \
            DistributedEngine(model, [], max_seq_len=32, buffer_type="f32") as one:
        assert np.abs(two.forward(ids, 0) - one.forward(ids, 0)).max() <= F32_CLUSTER_TOLERANCE


def hello_bytes(model, **overrides) -> bytes:
    from dllama.formats import read_model_header
    fields = dict(node_index=1, n_nodes=2, max_seq_len=32, buffer_type=BufferType.F32,
                  identity=model_identity(model), header_bytes=read_model_header(model).to_bytes(), weights=(1.0, 1.0))
    fields.update(overrides)
    return Hello(**fields).to_bytes()


def frame(kind: int, payload: bytes, length: int | None = None) -> bytes:
    return FRAME_HEADER.pack(len(payload) if length is None else length, kind, 0) + payload


GOOD_PREAMBLE = PREAMBLE.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION)
# a root's start to a worker without a cluster key: its preamble and an AUTH that proves nothing
KEYLESS_START = GOOD_PREAMBLE + frame(Frame.AUTH, bytes(64))
STAR = frame(Frame.EXCHANGE, b"\x00")  # after READY: the root's choice of the star exchange


def test_garbage_is_refused_and_the_worker_keeps_serving(f32_model):
    with loopback_workers(1) as (worker,):
        assert "not a dllama peer" in error_text(talk(worker.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert "unknown frame type" in error_text(talk(worker.address, GOOD_PREAMBLE + bytes(range(64))))
        talk(worker.address, b"\x00")  # a half preamble, then hang up
        still_serves(worker, f32_model)


def test_wrong_protocol_version_is_refused_with_the_fix(f32_model):
    with loopback_workers(1) as (worker,):
        text = error_text(talk(worker.address, PREAMBLE.pack(PROTOCOL_MAGIC, PROTOCOL_VERSION + 1)))
        assert f"version {PROTOCOL_VERSION + 1}" in text and "same dllama version" in text
        assert f"(dllama {__version__})" in text  # which version to install
        still_serves(worker, f32_model)


def test_oversized_frames_are_refused_before_allocating(f32_model):
    with loopback_workers(1) as (worker,):
        tracemalloc.start()
        try:
            text = error_text(talk(worker.address, GOOD_PREAMBLE + FRAME_HEADER.pack(0xFFFFFFF0, Frame.HELLO, 0)))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert "exceeds the limit" in text
        assert peak < 1 << 20  # not the 4 GiB it asked for
        # a HELLO whose model claims more memory than the machine has is refused, not allocated
        from dataclasses import replace

        from dllama.formats import read_model_header
        huge = replace(read_model_header(f32_model), dim=1 << 15, hidden_dim=1 << 20, n_layers=1024, vocab_size=1 << 20)
        from dllama.formats import model_file_size
        lying = hello_bytes(f32_model, header_bytes=huge.to_bytes(), identity=ModelIdentity(model_file_size(huge),
                                                                                            bytes(32)))
        text = error_text(talk(worker.address, KEYLESS_START + frame(Frame.HELLO, lying)))
        assert "MiB but this machine has" in text
        endless = replace(read_model_header(f32_model), n_layers=1 << 30)
        forged = hello_bytes(f32_model, header_bytes=endless.to_bytes())
        text = error_text(talk(worker.address, KEYLESS_START + frame(Frame.HELLO, forged)))
        assert "n_layers 1073741824 in its header, outside" in text  # refused by the header check, before any loop
        still_serves(worker, f32_model)


def test_an_oversized_forward_after_the_handshake_is_refused(f32_model):
    with loopback_workers(1, model_path=f32_model) as (worker,):  # its own copy: no weights to stream
        huge_batch = FORWARD_HEAD.pack(1 << 20, 0)
        reply = talk(worker.address, KEYLESS_START, frame(Frame.HELLO, hello_bytes(f32_model)), STAR,
                     frame(Frame.FORWARD, huge_batch, length=0x7FFFFFFF))
        assert b"FORWARD frame of 2147483647 bytes exceeds the limit" in reply
        reply = talk(worker.address, KEYLESS_START, frame(Frame.HELLO, hello_bytes(f32_model)), STAR,
                     frame(Frame.FORWARD, FORWARD_HEAD.pack(65, 0) + bytes(64)))
        assert b"FORWARD of 65 tokens (0 with logits) is outside the batch limit 64" in reply

        def forward(slots, positions) -> bytes:
            x = np.zeros((len(slots), 64), np.float32)
            return frame(Frame.FORWARD, b"".join(bytes(p) for p in forward_parts(x, np.array(slots),
                                                                                np.array(positions), 1)))

        for slots, positions, hello in (([0] * 5, range(30, 35), {}),  # positions 30..34 past max_seq_len 32
                                        ([0, 1], [3, 3], {}),  # a second slot the HELLO did not ask for
                                        ([0, 2], [3, 3], {"slots": 2})):
            reply = talk(worker.address, KEYLESS_START, frame(Frame.HELLO, hello_bytes(f32_model, **hello)), STAR,
                         forward(slots, positions))
            assert f"FORWARD puts a token in slot {max(slots)} or at position {max(positions)}".encode() in reply
        still_serves(worker, f32_model)


def test_weights_outside_the_workers_slices_are_refused(f32_model):
    with loopback_workers(1) as (worker,):  # no copy of its own: expects WEIGHTS
        start = KEYLESS_START + frame(Frame.HELLO, hello_bytes(f32_model)) + STAR
        reply = talk(worker.address, start + frame(Frame.WEIGHTS, WEIGHTS_HEAD.pack(9999, 0) + bytes(16)))
        assert b"WEIGHTS for tensor 9999, which this worker does not hold" in reply
        reply = talk(worker.address, start + frame(Frame.WEIGHTS, WEIGHTS_HEAD.pack(1, 1 << 40) + bytes(16)))
        assert b"overruns tensor 1 slice" in reply
        reply = talk(worker.address, start + frame(Frame.WEIGHTS_DONE, b""))
        assert b"slices are incomplete" in reply
        reply = talk(worker.address, start + frame(Frame.WEIGHTS, WEIGHTS_HEAD.pack(1, 16) + bytes(16)))
        assert b"WEIGHTS chunk at 16 of tensor 1, expected 0" in reply
        still_serves(worker, f32_model)


def test_a_model_that_differs_from_the_workers_copy_is_refused(tmp_path, f32_model):
    other = write_random_model(tmp_path / "other.m", FloatType.F32, n_kv_heads=2)
    with loopback_workers(1, model_path=other) as (worker,):
        with pytest.raises(WorkerError, match=rf"127\.0\.0\.1:{worker.address[1]}.*is not the root's model"):
            DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32")


def test_root_names_a_worker_that_is_not_there(f32_model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening, held: refused, and nobody else can take the port
        port = s.getsockname()[1]
        with pytest.raises(WorkerError, match=rf"worker 127\.0\.0\.1:{port} \(node 1\): connection refused"):
            DistributedEngine(f32_model, [("127.0.0.1", port)], max_seq_len=32, buffer_type="f32")


def test_a_second_root_is_told_at_once_that_the_worker_is_busy(f32_model):
    with loopback_workers(1) as (worker,):
        with DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32"):
            with pytest.raises(WorkerError, match="busy serving the root at 127.0.0.1"):  # told, not timed out
                DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32")
        still_serves(worker, f32_model)


def test_worker_serves_the_next_root_after_one_vanishes(f32_model):
    with loopback_workers(1) as (worker,):
        first = DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32")
        first.forward([1, 2, 3], 0)
        first.links[0].sock.close()  # the root dies without a goodbye
        first.links[0].sock = None
        still_serves(worker, f32_model)
        assert worker.sessions_served >= 1  # one root at a time: the first session had ended


def start_worker_process() -> tuple[subprocess.Popen, tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    match = re.search(r"listening on ([\d.]+):(\d+)", line)
    assert match, line
    return proc, (match.group(1), int(match.group(2)))


def test_killing_a_worker_mid_generation_names_it_by_its_closed_connection(f32_model):
    proc, address = start_worker_process()
    try:
        engine = DistributedEngine(f32_model, [address], max_seq_len=64, buffer_type="f32")
        token = 1
        with pytest.raises(WorkerError, match=rf"worker 127\.0\.0\.1:{address[1]} \(node 1\)") as info:
            for pos in range(60):
                if pos == 5:
                    proc.send_signal(signal.SIGKILL)
                token = int(np.argmax(engine.forward([token], pos)[-1]))
        # noticed by the closed connection, not by a timeout (PROGRESS_TIMEOUT_S's "frozen", "no answer in time")
        assert "frozen" not in str(info.value) and "in time" not in str(info.value)
        engine.close()
    finally:
        proc.kill()
        proc.wait()




def test_a_silent_peer_such_as_a_reference_worker_is_named_at_once_and_reads_none_of_our_bytes(f32_model):
    """A reference distributed-llama worker accepts and waits for its root's bytes (which it would read
    as socket counts and sizes): the root sends nothing before a dllama greeting, and says so."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        with pytest.raises(WorkerError, match=r"node 1\): accepted the connection but sent no dllama greeting .*"
                                              r"reference distributed-llama worker"):  # after GREETING_TIMEOUT_S
            DistributedEngine(f32_model, [silent.getsockname()[:2]], max_seq_len=32, buffer_type="f32")
        conn, _ = silent.accept()
        with conn:
            conn.settimeout(1)
            assert conn.recv(64) == b""  # the root closed without sending a byte


def test_a_hello_that_gives_a_worker_no_share_is_refused(f32_model):
    with loopback_workers(1) as (worker,):
        hello = hello_bytes(f32_model, n_nodes=3, weights=(1.0, 0.0, 1.0))
        assert "every worker needs a positive weight" in error_text(
            talk(worker.address, KEYLESS_START + frame(Frame.HELLO, hello)))
        still_serves(worker, f32_model)


def test_a_worker_answers_a_probe_with_its_memory_and_speed(f32_model):
    from dllama.runtime.distributed.protocol import NodeInfo

    with loopback_workers(1) as (worker,):
        reply = talk(worker.address, KEYLESS_START + frame(Frame.PROBE, b""))
        info = NodeInfo.parse(memoryview(frames(reply)[Frame.INFO]))
        assert 0 < info.available <= info.memory and info.speed > 1e6
        still_serves(worker, f32_model)


def test_reconnect_rebuilds_the_cluster_after_a_lost_link(f32_model):
    ids = np.array([1, 5, 9])
    with loopback_workers(2) as workers, \
            DistributedEngine(f32_model, [], max_seq_len=32, buffer_type="f32") as one, \
            DistributedEngine(f32_model, [w.address for w in workers], max_seq_len=32, buffer_type="f32") as three:
        want = one.forward(ids, 0)
        three.forward(ids, 0)
        three.links[1].sock.close()  # node 2's link dies; node 1's worker is still in the old session
        with pytest.raises(WorkerError, match=r"\(node 2\)"):
            three.forward([4], 3)
        three.reconnect()
        assert three.pos == 0 and all(link.streamed_bytes > 0 for link in three.links)
        assert np.abs(three.forward(ids, 0) - want).max() <= F32_CLUSTER_TOLERANCE


def test_a_reference_cpp_worker_is_named_in_one_line_and_gets_none_of_our_bytes(reference_dllama, f32_model):
    """Protocol 1 sent first, and the C++ worker read our preamble as its socket count (1.3 billion)."""
    cpp, port = start_reference_worker(reference_dllama)
    try:
        with pytest.raises(WorkerError, match="sent no dllama greeting.*reference distributed-llama worker"):
            DistributedEngine(f32_model, [("127.0.0.1", port)], max_seq_len=32, buffer_type="f32")
    finally:
        cpp.kill()
        cpp.wait()
    said = cpp.stdout.read().decode("utf-8", "replace")
    # it saw a root connect, then the connection close before any byte: it never read a node count
    assert "The root node has connected" in said and "nNodes" not in said, said


def start_reference_worker(binary, attempts: int = 5, deadline_s: float = 60) -> tuple[subprocess.Popen, int]:
    """The C++ worker cannot take port 0: a free port is found first, and another process may take it before
    the worker binds, so a worker that exits instead of listening is started again on another port."""
    from serve_helpers import free_port

    for _ in range(attempts):
        port = free_port()
        cpp = subprocess.Popen(["stdbuf", "-o0", str(binary), "worker", "--port", str(port), "--nthreads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + deadline_s
        while not listening(port) and cpp.poll() is None:  # not by connecting: that would end the C++ worker
            assert time.monotonic() < deadline, "the reference worker neither listened nor exited"
            time.sleep(0.05)  # bounded polling of /proc/net/tcp
        if cpp.poll() is None:
            return cpp, port
        cpp.wait()
    raise RuntimeError(f"the reference worker exited {attempts} times instead of listening")


def listening(port: int) -> bool:
    """Whether some socket listens on TCP `port` (Linux /proc/net/tcp, state 0A)."""
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A" for line in list(f)[1:])


def test_both_ends_of_a_cluster_link_probe_an_idle_peer_within_seconds_not_hours(f32_model):
    """A board that loses power sends no FIN: TCP keepalive on both ends of each link (KEEPALIVE_S: probe
    after 10 s idle, every 5 s, 3 probes) notices it in ~25 s instead of the kernel's default two hours.
    Read from the kernel (ss shows each socket's keepalive timer), not from our own code."""
    from dllama.runtime.distributed.protocol import KEEPALIVE_S

    if subprocess.run(["ss", "-V"], capture_output=True).returncode != 0:
        pytest.fail("ss (iproute2) is needed to read the sockets' timers")
    with loopback_workers(1, model_path=f32_model) as (worker,):
        with DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32") as engine:
            engine.forward([1, 2], 0)
            port = worker.address[1]
            deadline = time.monotonic() + 30
            while len(listed := keepalive_timers(port)) < 2:  # a timer shows once the link is idle (all acked)
                assert time.monotonic() < deadline, f"not both ends with a keepalive timer: {listed}"
            root_sock = engine.links[0].sock
            intervals = [root_sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                         for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")]
    assert len(listed) == 2, listed  # the root's end and the worker's
    assert all(seconds <= KEEPALIVE_S[0] <= 60 for seconds in listed), listed  # the next probe: seconds away
    idle, interval, count = intervals
    assert intervals == list(KEEPALIVE_S) and idle + interval * count <= 60  # a dead peer noticed within a minute


def keepalive_timers(port: int) -> list[float]:
    """Seconds to the next keepalive probe of each established socket on `port` that shows one (ss -o)."""
    lines = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    timers = []
    for line in lines:
        if timer := re.search(r"timer:\(keepalive,(?:(\d+)min)?([\d.]+)(ms|sec)", line):
            minutes, value, unit = timer.groups()
            timers.append(int(minutes or 0) * 60 + float(value) / (1000 if unit == "ms" else 1))
    return timers
