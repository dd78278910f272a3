"""The cluster key and the hardened worker (issue 28): strangers are refused and learn nothing, cannot
hold the worker, a copy that differs in one byte is refused, a frozen worker is named fast."""
from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import CONFORMANCE, require_fixtures
from distributed_helpers import F32_CLUSTER_TOLERANCE, loopback_workers
from test_distributed_faults import KEYLESS_START, frame, frames, still_serves, talk

from dllama.errors import FormatError
from dllama.runtime.distributed import protocol
from dllama.runtime.distributed.auth import AuthError, FrameMac, load_cluster_key
from dllama.runtime.distributed.protocol import (
    HANDSHAKE_DEADLINE_S,
    PROGRESS_TIMEOUT_S,
    Channel,
    Frame,
    ProtocolError,
    digest_cache,
    model_identity,
)
from dllama.runtime.distributed.root import DistributedEngine, WorkerError
from dllama.runtime.distributed.worker import Worker

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def f32_model():
    return require_fixtures(CONFORMANCE / "tiny-llama") / "expected_f32.m"


def test_a_root_without_the_key_or_with_another_is_refused_and_learns_nothing(f32_model):
    with loopback_workers(1, model_path=f32_model, cluster_key=KEY) as (worker,):
        with pytest.raises(WorkerError, match="needs the cluster key"):
            DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32")
        with pytest.raises(WorkerError, match="the root did not prove the cluster key"):
            DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32",
                              cluster_key=b"another key of 32 bytes, not it")
        # a stranger who skips the proof and asks for the worker's memory and speed gets one refusal line
        reply = talk(worker.address, KEYLESS_START + frame(Frame.PROBE, b""))
        said = frames(reply)
        assert set(said) == {Frame.CHALLENGE, Frame.ERROR}, said
        assert said[Frame.CHALLENGE][0] == 1  # "I need the key": nothing else about the worker
        assert said[Frame.ERROR].startswith(b"the root did not prove the cluster key")
        identity = model_identity(f32_model)
        assert str(f32_model).encode() not in reply and identity.digest[:6] not in reply
        assert worker.busy_with is None and worker.sessions_served == 0
        with DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32",
                               cluster_key=KEY) as two, \
                DistributedEngine(f32_model, [], max_seq_len=32, buffer_type="f32") as one:
            ids = np.array([1, 5, 9])
            assert np.abs(two.forward(ids, 0) - one.forward(ids, 0)).max() <= F32_CLUSTER_TOLERANCE


def test_a_root_with_a_key_refuses_a_worker_without_one(f32_model):
    with loopback_workers(1) as (worker,):
        with pytest.raises(WorkerError, match="runs without a cluster key"):
            DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32", cluster_key=KEY)
        still_serves(worker, f32_model)


def test_the_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DLLAMA_CLUSTER_KEY", raising=False)
    assert load_cluster_key(None) is None
    monkeypatch.setenv("DLLAMA_CLUSTER_KEY", KEY.decode())
    assert load_cluster_key(None) == KEY
    (tmp_path / "k").write_bytes(b"short\n")
    with pytest.raises(AuthError, match="holds 5 bytes: use at least 16"):
        load_cluster_key(tmp_path / "k")
    with pytest.raises(AuthError, match="cannot read the cluster key file"):
        load_cluster_key(tmp_path / "missing")


def test_a_changed_or_replayed_frame_fails_authentication():
    def pair():
        a, b = socket.socketpair()
        return Channel(a), Channel(b)

    sender, wire = pair()
    sender.authenticate(FrameMac(KEY), FrameMac(KEY))
    sender.send_frame(Frame.PARTIAL, b"\x01" * 40)
    wire.sock.settimeout(5)
    sent = wire.sock.recv(4096)
    for tampered, reason in ((sent[:20] + b"\x02" + sent[21:], "changed"), (sent + sent, "replayed")):
        into, receiver = pair()
        receiver.authenticate(FrameMac(KEY), FrameMac(KEY))
        into.sock.sendall(tampered)
        if reason == "replayed":
            receiver.recv_frame(4096)  # the first copy is genuine
        with pytest.raises(ProtocolError, match="failed authentication"):
            receiver.recv_frame(4096)


def test_a_large_frame_read_in_pieces_is_checked_whole():
    """Frames over 256 KiB (weight chunks) are tagged by streaming, not in one call: a genuine one read in
    pieces passes, one byte changed deep inside it fails."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    for flip in (None, 700_000):
        a, b = socket.socketpair()
        b.settimeout(60)  # a sender that failed must not hang the suite
        sender, receiver = Channel(a), Channel(b)
        sender.authenticate(FrameMac(KEY), FrameMac(KEY))
        receiver.authenticate(FrameMac(KEY), FrameMac(KEY))
        sent = threading.Thread(target=sender.send_frame, args=(Frame.WEIGHTS, payload))
        if flip is not None:  # the same bytes with one changed, put on the wire by hand
            tap_a, tap_b = socket.socketpair()
            sender = Channel(tap_a)
            sender.authenticate(FrameMac(KEY), FrameMac(KEY))
            sent = threading.Thread(target=lambda: a.sendall(tampered(tap_b, sender, payload, flip)))
        sent.start()
        kind, length = receiver.recv_header(2 << 20)
        got = b"".join(bytes(receiver.recv_exact(n)) for n in (1000, length - 1000))
        if flip is None:
            receiver.end_frame()
            assert (kind, got) == (Frame.WEIGHTS, payload)
        else:
            with pytest.raises(ProtocolError, match="failed authentication"):
                receiver.end_frame()
        sent.join()
        a.close(), b.close()


def tampered(tap: socket.socket, sender: Channel, payload: bytes, flip: int) -> bytes:
    """What `sender` puts on the wire for `payload`, with byte `flip` of the payload changed."""
    threading.Thread(target=sender.send_frame, args=(Frame.WEIGHTS, payload)).start()
    wire = bytearray()
    while len(wire) < len(payload) + 8 + 16:
        wire += tap.recv(1 << 20)
    wire[8 + flip] ^= 1
    return bytes(wire)


def test_idle_and_dribbling_strangers_do_not_keep_the_root_out(f32_model):
    with loopback_workers(1, cluster_key=KEY) as (worker,):
        idle = socket.create_connection(worker.address)
        dribbler = socket.create_connection(worker.address)
        try:
            dribbler.settimeout(0.3)
            with DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32",
                                   cluster_key=KEY) as engine:
                engine.forward([1, 2, 3], 0)
            # a byte at a time of a valid start never completes a handshake: the deadline ends it
            closed = False
            for i in range(int(4 * HANDSHAKE_DEADLINE_S / 0.3)):  # ~4 deadlines at most
                try:
                    dribbler.sendall(KEYLESS_START[i % len(KEYLESS_START):][:1])
                    while dribbler.recv(4096):  # the greeting, then (at the deadline) an ERROR
                        pass
                    closed = True
                    break
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed, "the dribbling stranger outlived the handshake deadline"
        finally:
            idle.close()
            dribbler.close()
        still_serves_with_key(worker, f32_model)


def still_serves_with_key(worker, model) -> None:
    with DistributedEngine(model, [worker.address], max_seq_len=32, buffer_type="f32", cluster_key=KEY) as engine:
        assert np.isfinite(engine.forward([4], 0)).all()


def test_a_copy_that_differs_in_one_byte_anywhere_is_refused(tmp_path, f32_model, monkeypatch):
    monkeypatch.setattr(protocol, "DIGEST_CACHE_MIN_BYTES", 0)  # cache the small fixture's digest too
    copy = tmp_path / "copy.m"
    shutil.copyfile(f32_model, copy)
    assert model_identity(copy) == model_identity(f32_model)
    assert digest_cache(str(copy.resolve())).is_file()  # computed once, then cached by size, inode and mtime
    data = bytearray(copy.read_bytes())
    data[len(data) // 2 + 1234] ^= 0x01  # far from any 4 KiB sample the old identity read
    copy.write_bytes(bytes(data))
    with loopback_workers(1, model_path=copy) as (worker,):
        with pytest.raises(WorkerError, match=r"--model .*copy\.m .* is not the root's model"):
            DistributedEngine(f32_model, [worker.address], max_seq_len=32, buffer_type="f32")


def test_a_worker_checks_its_model_at_start_up(tmp_path, f32_model):
    cut = tmp_path / "cut.m"
    cut.write_bytes(f32_model.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        Worker("127.0.0.1", 0, model_path=cut, log=lambda msg: None)


def test_a_frozen_worker_is_named_by_the_progress_timeout(f32_model, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dllama.cli.dllama_run", "worker", "--host", "127.0.0.1",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        assert match, line
        assert "anyone who reaches its port can use it" in proc.stderr.readline()
        address = (match.group(1), int(match.group(2)))
        engine = DistributedEngine(f32_model, [address], max_seq_len=64, buffer_type="f32")
        token = 1
        # "sent nothing for PROGRESS_TIMEOUT_S": the heartbeat path named it, not the 120 s I/O timeout
        with pytest.raises(WorkerError, match=rf"127\.0\.0\.1:{address[1]} \(node 1\): .*"
                                              rf"sent nothing for {PROGRESS_TIMEOUT_S:.0f} s.*frozen"):
            for pos in range(60):
                if pos == 5:
                    proc.send_signal(signal.SIGSTOP)
                token = int(np.argmax(engine.forward([token], pos)[-1]))
        engine.close()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
