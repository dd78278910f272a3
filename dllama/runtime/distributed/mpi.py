"""The cluster under MPI: `mpiexec -n N dllama-run mpi --model M --tokenizer T ...`.

Every rank runs the same command line. Rank 0 is the root (prompt, sampling, API) and gets an
`MpiEngine`, the single-node `Engine` with an MPI `Exchange`; ranks 1..N-1 run the same layer
loop (`Engine.run_layers`) on the x rank 0 broadcasts, until rank 0 says stop. Each rank maps its
own copy of the `.m` (the same path on every board) and takes its share of `ClusterSplit.plan`,
exactly the node of the same index in the TCP mode.

Same bits as the TCP mode (docs/PROTOCOL.md "MPI"): at each seam every rank contributes its
partial encoded as it would travel in a PARTIAL frame (q80 blocks or float32) to one Allgather,
then decodes every computing rank's and adds them with `exchange.sum_partials`, in rank order,
its own after the same round trip; logits slices travel as LOGITS would (f16 with q80 buffers)
in one Gatherv to rank 0.

Before any collective of the model, one allgather of every rank's status (host, pid, model
identity, or the problem it found) lets rank 0 refuse a missing or different model, naming the
rank and host. A rank that dies is named by `mpi_watch`, a small process rank 0 starts outside
the MPI job (mpiexec kills every rank, rank 0 included, the moment one dies).
"""
from __future__ import annotations

import atexit
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dllama.formats import FormatError, ModelFile, ModelHeader, parse_model_header
from dllama.runtime import dispatch
from dllama.runtime.distributed.exchange import (
    decode_partial,
    encode_logits,
    encode_partial,
    partial_nbytes,
    sum_partials,
)
from dllama.runtime.distributed.node_memory import DEFAULT_MAX_PARALLEL, parallel_that_fits, shard_tensors
from dllama.runtime.distributed.probe import NodeInfo, node_info
from dllama.runtime.distributed.protocol import BufferType, model_identity
from dllama.runtime.distributed.root import (
    Traffic,
    WorkerError,
    asks_auto_weights,
    exchange_type,
    fixed_weights,
    measured_weights,
)
from dllama.runtime.distributed.slices import load_local_slices, read_slice_chunks
from dllama.runtime.distributed.weights import node_weights
from dllama.runtime.engine import PREFILL_BATCH, Engine, EngineError
from dllama.runtime.model import NodeLayers, Places, logit_rows
from dllama.runtime.split import ClusterSplit, NodeShare, SplitError

MPI_WORKERS = "@mpi"  # ClusterOptions.workers of `dllama-run mpi`: not a host name, so never a TCP worker
INSTALL_HINT = 'pip install "dllama[mpi]" (mpi4py and an MPI library) on every board'

# A command: kind, position of the first token, token count; padded so that x's first row, which
# travels in the same broadcast (a decode step is one message), starts 16-byte aligned.
COMMAND_WORDS = 5  # kind, tokens T, logits rows R (the last R tokens'), the first token's slot and position
FORWARD, STOP = 1, 2
PARTIAL_TAG, COMMAND_TAG, WEIGHTS_TAG, LOGITS_TAG = 8, 7, 4, 9  # as the TCP frames PARTIAL, FORWARD, WEIGHTS, LOGITS
STREAM_WEIGHTS = False  # dllama-run mpi --stream-weights: only rank 0 needs the .m
EXCHANGE_ALGORITHMS = ("direct", "allgather")
IDLE_SPIN_S = 0.002      # a worker waiting for the next token polls at full speed this long, then sleeps
IDLE_SLEEP_MAX_S = 0.005  # (a chat root may wait minutes for its user; a busy-wait would burn a core)
REFUSAL_WAIT_S = 5.0     # a worker that refuses to start leaves the job's last word to rank 0
ORPHAN_GRACE_S = 2.0     # a worker whose lifeline closed waits this long for a last command before leaving
# A wait inside a forward that makes no progress this long names the rank(s) that did not answer
# (dllama-run mpi --progress-timeout): a stopped, swapping or hung rank holds every other one.
# The other ranks wait twice as long, so that rank 0 is the one that speaks.
PROGRESS_TIMEOUT_S = 30.0


class MpiError(WorkerError):
    """A rank refused, died or MPI failed; the message names the rank and its host."""


def import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MpiError(f"dllama-run mpi needs mpi4py and an MPI library ({e}): {INSTALL_HINT}") from None
    return MPI


# --------------------------------------------------------------------------------------------
# Start-up: every rank checks its own model, then one allgather tells everyone about everyone

@dataclass
class RankStatus:
    rank: int
    host: str
    pid: int
    problem: str | None = None
    identity: tuple[int, bytes] | None = None   # model_identity (size, digest)
    info: NodeInfo | None = None                 # memory and speed, for --weights auto
    addresses: list[str] = field(default_factory=list)  # rank 0's, where the others dial its lifeline
    lifeline_port: int = 0

    @property
    def name(self) -> str:
        return f"rank {self.rank} on {self.host} (pid {self.pid})"


def local_status(comm, model_path: Path, probe: bool, nthreads: int | None,
                 needs_model: bool = True) -> tuple[RankStatus, ModelFile | None]:
    """What this rank found: its model's identity, or the one-line problem."""
    MPI = import_mpi()
    status = RankStatus(comm.rank, MPI.Get_processor_name(), os.getpid())
    model = None
    try:
        if probe:
            status.info = node_info(nthreads)
        if not needs_model:
            return status, None
        if not model_path.is_file():
            raise FormatError(f"model file {model_path} does not exist on {status.host}: copy the same .m to the same "
                              "path on every board")
        model = ModelFile(model_path)
        identity = model_identity(model_path)
        status.identity = (identity.size, identity.digest)
    except OSError as e:
        status.problem = f"cannot read {model_path}: {e.strerror or e}"
    except (FormatError, ValueError) as e:
        status.problem = str(e)
    return status, model


def refusal(statuses: list[RankStatus], model_path: Path) -> str | None:
    """The one line rank 0 prints when a rank cannot take part (every rank computes the same answer)."""
    for s in statuses:
        if s.problem:
            return f"{s.name}: {s.problem}"
    root = statuses[0]
    for s in statuses[1:]:
        if s.identity is not None and s.identity != root.identity:  # None: it receives rank 0's slices
            return (f"{s.name} has a different {model_path} ({s.identity[0]} bytes, sha256 {s.identity[1].hex()[:12]}) "
                    f"than rank 0 ({root.identity[0]} bytes, sha256 {root.identity[1].hex()[:12]}): copy the same .m "
                    "to every board")
    return None


def cluster_split(h: ModelHeader, statuses: list[RankStatus], weights: str | None, root_compute: str) -> ClusterSplit:
    n = len(statuses)
    if asks_auto_weights(weights):
        return ClusterSplit.plan(h, n, measured_weights([s.info for s in statuses], root_compute))
    return ClusterSplit.plan(h, n, fixed_weights(n, weights, root_compute))


# --------------------------------------------------------------------------------------------
# The exchange: the same protocol as the TCP mode's, over collectives

class MpiExchange:
    """engine.Exchange over MPI collectives; the same object on every rank (rank 0 also calls begin)."""

    def __init__(self, comm, split: ClusterSplit, h: ModelHeader, buffer_type: BufferType,
                 algorithm: str = "direct", names: list[str] | None = None,
                 progress_timeout: float | None = None):
        """algorithm: how partials meet, "direct" (every rank to every rank, one step) or "allgather"
        (MPI_Iallgather, the library's algorithm); both give the same bits. names: each rank's, for
        the line that names a rank that stopped answering within `progress_timeout` seconds."""
        if algorithm not in EXCHANGE_ALGORITHMS:
            raise ValueError(f"unknown MPI exchange {algorithm!r}: use one of {', '.join(EXCHANGE_ALGORITHMS)}")
        self.algorithm = algorithm
        self.comm = comm
        self.names = names or [f"rank {r}" for r in range(comm.size)]
        timeout = PROGRESS_TIMEOUT_S if progress_timeout is None else progress_timeout
        self.progress_timeout = timeout if comm.rank == 0 else 2 * timeout
        self.split = split
        self.computing = split.computing
        self.dim = h.dim
        self.buffer_type = buffer_type
        self.traffic = Traffic()
        self.collectives = 0  # per-layer exchanges, broadcasts and gathers: each at least one network latency
        self.broken = False
        self.command = np.zeros(COMMAND_WORDS + h.dim, dtype=np.int32)  # x's first row as int32 bits

    carries_steps = True  # every token's slot and position go with the command: Engine.step's sequences share a pass

    # -- root: what the workers wait for
    def begin(self, x: np.ndarray, pos: int | Places, logits: str | int = "all") -> None:
        self._command(FORWARD, Places.of(pos, len(x)), x, logit_rows(logits, len(x)))
        self.traffic.tokens += len(x)

    def stop(self) -> None:
        self._command(STOP, Places.of(0, 1), np.zeros((1, self.dim), dtype=np.float32))

    def _command(self, kind: int, places: Places, x: np.ndarray, rows: int = 0) -> None:
        """The command and the first token's place and x row in one message; the other tokens' places and
        rows in a second one (a prompt's, or a step's of several sequences)."""
        n = len(x)
        self.command[:COMMAND_WORDS] = (kind, n, rows, places.slots[0], places.positions[0])
        self.command[COMMAND_WORDS:] = np.ascontiguousarray(x[0], dtype=np.float32).view(np.int32)
        self._bcast(self.command)
        if n > 1:
            rest = np.empty(2 * (n - 1) + (n - 1) * self.dim, dtype=np.int32)
            rest[:n - 1], rest[n - 1:2 * (n - 1)] = places.slots[1:], places.positions[1:]
            rest[2 * (n - 1):] = np.ascontiguousarray(x[1:], dtype=np.float32).reshape(-1).view(np.int32)
            self._bcast(rest)

    # -- workers: wait for it
    def next_command(self, lifeline: socket.socket | None) -> tuple[int, Places | None, np.ndarray | None, int]:
        """(kind, each token's place, x, logits rows) from rank 0; polls, then sleeps between polls while rank 0
        is idle."""
        requests = self._start_bcast(self.command)
        started, pause, orphaned = time.monotonic(), 0.0001, None

        def idle() -> None:
            nonlocal pause, orphaned
            now = time.monotonic()
            if now - started < IDLE_SPIN_S:
                os.sched_yield()
                return
            if orphaned is None and lifeline is not None and select.select([lifeline], [], [], pause)[0] \
                    and not lifeline.recv(1):
                orphaned = now  # rank 0's STOP may still be on its way: the lifeline closes right after it
            elif orphaned is not None and now - orphaned > ORPHAN_GRACE_S:
                raise MpiError("rank 0 went away")
            else:
                time.sleep(pause)
            pause = min(2 * pause, IDLE_SLEEP_MAX_S)

        MPI = import_mpi()
        while not MPI.Request.Testall(requests):
            idle()
        self.collectives += 1
        kind, n, rows, slot, pos = (int(v) for v in self.command[:COMMAND_WORDS])
        if kind != FORWARD:
            return kind, None, None, 0
        x = np.empty((n, self.dim), dtype=np.float32)
        x[0] = self.command[COMMAND_WORDS:].view(np.float32)
        slots, positions = np.full(n, slot, dtype=np.int64), np.full(n, pos, dtype=np.int64)
        self.traffic.received += self.command.nbytes
        if n > 1:
            rest = np.empty(2 * (n - 1) + (n - 1) * self.dim, dtype=np.int32)
            self._bcast(rest)
            slots[1:], positions[1:] = rest[:n - 1], rest[n - 1:2 * (n - 1)]
            x[1:] = rest[2 * (n - 1):].view(np.float32).reshape(n - 1, self.dim)
        return kind, Places(positions, slots), x, rows

    def reduce_into(self, x: np.ndarray, partial: np.ndarray | None, layer: int, stage: str) -> None:
        """Allgather every rank's partial as its PARTIAL frame would carry it, then add the computing
        ranks' in rank order (exchange.sum_partials): the TCP mode's bits on every rank."""
        n, dim = x.shape
        size = partial_nbytes(n, dim, self.buffer_type)
        own = (np.frombuffer(encode_partial(partial, self.buffer_type), dtype=np.uint8) if partial is not None
               else np.zeros(size, dtype=np.uint8))  # a coordinator root contributes a placeholder nobody adds
        every = np.empty((self.comm.size, size), dtype=np.uint8)
        if self.algorithm == "allgather":
            self._run(lambda: self.comm.Iallgather(own, every))
            self.traffic.sent += size
            self.traffic.received += size * (self.comm.size - 1)
        else:
            every[self.comm.rank] = own
            self._run_all(*self._direct(own, every))
        # no layer or seam number travels: every rank runs the same loop, so the collectives pair up in order
        x += sum_partials([decode_partial(memoryview(every[i]), n, dim, self.buffer_type) for i in self.computing])

    def _direct(self, own: np.ndarray, every: np.ndarray) -> tuple[list, list[int]]:
        """Every computing rank's partial straight to every other rank: one network latency per seam,
        where a library allgather takes log2(ranks) steps (recursive doubling) for these small vectors.
        MPI keeps messages between two ranks in order, so one tag serves every seam.
        Returns the requests and the peer rank of each."""
        me, requests, peers = self.comm.rank, [], []
        for r in self.computing:
            if r != me:
                requests.append(self.comm.Irecv(every[r], source=r, tag=PARTIAL_TAG))
                peers.append(r)
                self.traffic.received += every[r].nbytes
        if me in self.computing:
            for r in range(self.comm.size):
                if r != me:
                    requests.append(self.comm.Isend(own, dest=r, tag=PARTIAL_TAG))
                    peers.append(r)
                    self.traffic.sent += own.nbytes
        return requests, peers

    def gather_logits(self, logits_slice: np.ndarray) -> np.ndarray:
        """Rank 0 gets every rank's vocabulary rows, the workers' encoded as LOGITS frames would be."""
        n = len(logits_slice)
        widths = [node.vocab[1] - node.vocab[0] for node in self.split.nodes]
        if n == 0:  # a prompt batch before its last (every rank knows it from the command)
            return np.empty((0, sum(widths)), dtype=np.float32)
        itemsize = 2 if self.buffer_type == BufferType.Q80 else 4
        direct = self.algorithm == "direct"  # point to point, so that a rank that does not answer is named
        if self.comm.rank != 0:
            data = np.frombuffer(encode_logits(logits_slice, self.buffer_type)[1], dtype=np.uint8)
            if direct:
                self._run_all([self.comm.Isend(data, dest=0, tag=LOGITS_TAG)], [0])
            else:
                self._run(lambda: self.comm.Igatherv(data, None, root=0))
            self.traffic.sent += len(data)
            return logits_slice
        counts = [0] + [n * w * itemsize for w in widths[1:]]
        received = np.empty(sum(counts), dtype=np.uint8)
        if direct:
            ends = np.cumsum(counts)
            self._run_all([self.comm.Irecv(received[ends[r] - counts[r]:ends[r]], source=r, tag=LOGITS_TAG)
                           for r in range(1, self.comm.size)], list(range(1, self.comm.size)))
        else:
            self._run(lambda: self.comm.Igatherv(np.empty(0, dtype=np.uint8), [received, counts], root=0))
        self.traffic.received += len(received)
        dtype = "<f2" if itemsize == 2 else "<f4"
        parts, at = [logits_slice], 0
        for count, width in zip(counts[1:], widths[1:]):
            parts.append(received[at:at + count].view(dtype).reshape(n, width).astype(np.float32))
            at += count
        return np.concatenate(parts, axis=1)

    def _bcast(self, buffer: np.ndarray) -> None:
        requests = self._start_bcast(buffer)
        direct = self.algorithm == "direct"
        self._run_all(requests, (list(range(1, self.comm.size)) if self.comm.rank == 0 else [0]) if direct else None)
        if self.comm.rank == 0:
            self.traffic.sent += buffer.nbytes * (self.comm.size - 1)
        else:
            self.traffic.received += buffer.nbytes

    def _start_bcast(self, buffer: np.ndarray) -> list:
        """Rank 0's buffer to every rank: straight from rank 0 ("direct", one step) or MPI_Ibcast (a tree)."""
        if self.algorithm == "allgather":
            return [self.comm.Ibcast(buffer, root=0)]
        if self.comm.rank != 0:
            return [self.comm.Irecv(buffer, source=0, tag=COMMAND_TAG)]
        return [self.comm.Isend(buffer, dest=r, tag=COMMAND_TAG) for r in range(1, self.comm.size)]

    def _run(self, start: Callable) -> None:
        self._run_all(lambda: [start()])

    def _run_all(self, start: Callable | list, peers: list[int] | None = None) -> None:
        """Wait for the requests (peers: the rank each one waits on, where known), naming the ranks
        that did not answer within the progress timeout."""
        MPI = import_mpi()
        try:
            requests = start() if callable(start) else start
            deadline = time.monotonic() + self.progress_timeout
            while not MPI.Request.Testall(requests):
                os.sched_yield()  # a board's one rank spins on; an oversubscribed machine lets the others run
                if time.monotonic() > deadline:
                    self.broken = True
                    raise MpiError(self._silent(requests, peers))
        except MPI.Exception as e:
            self.broken = True
            raise MpiError(f"MPI failed during the exchange: {e.Get_error_string()}") from None
        self.collectives += 1

    def _silent(self, requests: list, peers: list[int] | None) -> str:
        """The line naming who did not answer (a collective cannot say which rank it waits on)."""
        if peers is None:
            waiting = [r for r in range(self.comm.size) if r != self.comm.rank]
            who = "one of " + ", ".join(self.names[r] for r in waiting)
        else:
            silent = sorted({p for req, p in zip(requests, peers) if not req.Test()})
            who = ", ".join(self.names[r] for r in silent) or "a rank"
        return (f"{who} answered nothing for {self.progress_timeout:.0f} s inside a forward: it is frozen (stopped, "
                "swapping, hung) or its network is down; check that board, then start mpiexec again "
                "(--progress-timeout sets this limit)")


# --------------------------------------------------------------------------------------------
# Lifelines: a TCP connection from every rank to rank 0, watched by `mpi_watch`

def local_addresses() -> list[str]:
    """This host's IPv4 addresses, loopback last (where the other ranks may reach rank 0)."""
    import fcntl
    import struct

    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            found.append(socket.inet_ntoa(packed[20:24]))
    try:  # the address this host's name resolves to is the likeliest to be reachable from the others
        named = socket.gethostbyname(socket.gethostname())
    except OSError:
        named = None
    return sorted(set(found), key=lambda a: (a.startswith("127."), a != named))


def dial_lifeline(addresses: list[str], port: int, rank: int) -> socket.socket:
    last = None
    for address in addresses:
        try:
            sock = socket.create_connection((address, port), timeout=2.0)
        except OSError as e:
            last = e
            continue
        sock.sendall(rank.to_bytes(4, "little"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return sock
    raise MpiError(f"rank {rank} cannot reach rank 0's lifeline at {', '.join(addresses)} port {port}: {last}")


@dataclass
class Watch:
    """Rank 0's side: the watcher process and its pipe (closed = the session ended normally)."""

    proc: subprocess.Popen

    def quiet(self) -> None:
        """The job is about to end normally: lifelines closing from now on are no news."""
        try:
            self.proc.stdin.write(b"quiet\n")
            self.proc.stdin.flush()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def start_watch(listener: socket.socket, statuses: list[RankStatus]) -> Watch:
    """Accept every rank's lifeline and hand them to `mpi_watch`, started in its own session so that
    mpiexec, which SIGKILLs every rank when one dies, leaves it to say which one."""
    names = {s.rank: s.name for s in statuses}
    listener.settimeout(30)
    conns = []
    while len(conns) < len(statuses) - 1:
        conn, _ = listener.accept()
        rank = int.from_bytes(conn.recv(4), "little")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conns.append((conn, names.get(rank, f"rank {rank}")))
    listener.close()
    table = "\n".join(f"{c.fileno()}\t{name}" for c, name in conns)
    proc = subprocess.Popen([sys.executable, "-m", "dllama.runtime.distributed.mpi_watch", str(os.getpid()),
                             names[0]],
                            stdin=subprocess.PIPE, pass_fds=[c.fileno() for c, _ in conns], start_new_session=True)
    proc.stdin.write(table.encode() + b"\n\n")
    proc.stdin.flush()
    for c, _ in conns:
        c.close()  # the watcher holds them now
    return Watch(proc)


# --------------------------------------------------------------------------------------------
# The engines

@dataclass
class RankSetup:
    comm: object
    header: ModelHeader
    model: ModelFile | None  # None: a rank that receives its slices from rank 0 (--stream-weights)
    split: ClusterSplit
    buffer_type: BufferType
    max_seq_len: int
    statuses: list[RankStatus]
    stream: bool = False
    slots: int = 1  # KV cache slots (serve --parallel): every rank keeps its slice of each
    lifeline: socket.socket | None = None
    listener: socket.socket | None = None


def join_cluster(comm, model_path: Path, max_seq_len: int, nthreads: int | None, buffer_float_type: str | None,
                 weights: str | None, root_compute: str, stream: bool = False, slots: int | None = 1) -> RankSetup:
    """Every rank: check its own model (with `stream`, only rank 0 has one), allgather the statuses,
    agree on the split (or all refuse) and, for `slots` None, on what every rank's free memory holds."""
    auto = isinstance(weights, str) and weights.strip().lower() == "auto"
    status, model = local_status(comm, model_path, auto or slots is None, nthreads,
                                 needs_model=comm.rank == 0 or not stream)
    listener = None
    if comm.rank == 0:
        listener = socket.create_server(("0.0.0.0", 0))
        status.addresses, status.lifeline_port = local_addresses(), listener.getsockname()[1]
    statuses = comm.allgather(status)  # the first collective: nothing of the model has moved yet
    if problem := refusal(statuses, model_path):
        raise MpiError(problem)
    h = model.header if not stream else parse_model_header(comm.bcast(model.header.to_bytes() if model else None))
    split = cluster_split(h, statuses, weights, root_compute)  # the same on every rank, or the same SplitError
    max_seq_len = min(max_seq_len, h.max_seq_len)
    if max_seq_len < 1:
        raise EngineError(f"max_seq_len {max_seq_len} must be at least 1")
    if slots is None:  # the same on every rank: every rank has every status
        slots = parallel_that_fits(h, max_seq_len, [s.info.available for s in statuses], PREFILL_BATCH,
                                   DEFAULT_MAX_PARALLEL, split.weights)
    setup = RankSetup(comm, h, model, split, exchange_type(h, buffer_float_type), max_seq_len, statuses, stream,
                      listener=listener, slots=slots)
    if comm.rank != 0:
        try:
            setup.lifeline = dial_lifeline(statuses[0].addresses, statuses[0].lifeline_port, comm.rank)
        except MpiError as e:  # only this rank knows: say it before rank 0 is taken down with it
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise
    return setup


def rank_layers(setup: RankSetup) -> tuple[NodeLayers, MpiExchange]:
    """This rank's share of the layers, from its own copy of the model (or streamed by rank 0), and its exchange."""
    h, share, comm = setup.header, setup.split.nodes[setup.comm.rank], setup.comm
    if setup.stream and comm.rank == 0:
        stream_slices_to_ranks(comm, setup.model.path, h, setup.split)
    if setup.stream and comm.rank != 0:
        slices = receive_slices(comm, h, share)
    else:
        slices = load_local_slices(setup.model.path, h, share)
    layers = NodeLayers(h, node_weights(h, slices, share), share, setup.max_seq_len, setup.slots)
    algorithm = os.environ.get("DLLAMA_MPI_EXCHANGE", "direct")  # mpiexec passes it to every rank
    return layers, MpiExchange(setup.comm, setup.split, h, setup.buffer_type, algorithm,
                               [s.name for s in setup.statuses])


def stream_slices_to_ranks(comm, model_path: Path, h: ModelHeader, split: ClusterSplit) -> None:
    """Rank 0 sends every other rank exactly its slices, read as the TCP root reads them
    (slices.read_slice_chunks), in the order `receive_slices` expects them."""
    for share in split.nodes[1:]:
        for _, _, data in read_slice_chunks(model_path, h, share):
            comm.Send(np.frombuffer(data, dtype=np.uint8), dest=share.node, tag=WEIGHTS_TAG)


def receive_slices(comm, h: ModelHeader, share: NodeShare) -> dict[str, np.ndarray]:
    MPI = import_mpi()
    out, status = {}, MPI.Status()
    for _, spec in shard_tensors(h, share):
        buf = np.empty(share.geometry(spec).nbytes, dtype=np.uint8)
        got = 0
        while got < len(buf):
            comm.Recv(buf[got:], source=0, tag=WEIGHTS_TAG, status=status)
            got += status.Get_count(MPI.BYTE)
        out[spec.name] = buf
    return out


class MpiEngine(Engine):
    """Rank 0: an Engine whose exchange is MPI. close() (also at exit) lets the other ranks go."""

    def __init__(self, setup: RankSetup, nthreads: int | None, log: Callable[[str], None]):
        layers, exchange = rank_layers(setup)
        super().__init__(setup.header, layers, exchange, setup.max_seq_len, nthreads,
                         embedding=setup.model.rows("embedding"), model=setup.model)
        self.split, self.statuses = setup.split, setup.statuses
        for s, share in zip(setup.statuses, setup.split.nodes):
            log(f"{s.name}: {share.describe()}")
        self.watch = start_watch(setup.listener, setup.statuses) if setup.comm.size > 1 else None
        self.closed = False
        atexit.register(self.close)

    @property
    def traffic(self) -> Traffic:
        return self.exchange.traffic

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watch is not None:
            self.watch.quiet()
        if not self.exchange.broken:
            try:
                self.exchange.stop()
            except MpiError:
                pass
        if self.watch is not None:
            self.watch.finish()
        if self.exchange.broken:
            # MPI_Finalize would wait for the rank that stopped answering: leave now (the error line
            # is out), and mpiexec ends the other ranks, a stopped one included, when rank 0 exits
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


def serve_rank(setup: RankSetup, nthreads: int | None) -> None:
    """Ranks 1..N-1: run the layer loop on every batch rank 0 broadcasts, until it says stop."""
    layers, exchange = rank_layers(setup)
    engine = Engine(setup.header, layers, exchange, setup.max_seq_len, nthreads, model=setup.model)
    dispatch.set_threads(engine.nthreads)
    while True:
        kind, places, x, rows = exchange.next_command(setup.lifeline)
        if kind != FORWARD:
            return
        if places.slots.max() >= setup.slots or places.positions.max() >= setup.max_seq_len:
            raise MpiError(f"rank 0 put a token in slot {places.slots.max()} or at position {places.positions.max()}: "
                           f"outside {setup.slots} slots of {setup.max_seq_len} positions (the ranks' options differ)")
        engine.run_layers(x, places, logits=rows)


def open_mpi_engine(model_path: Path, max_seq_len: int, nthreads: int | None, buffer_float_type: str | None = None,
                    weights: str | None = None, root_compute: str = "all",
                    log: Callable[[str], None] | None = None, stream: bool | None = None,
                    slots: int | None = 1) -> MpiEngine:
    """On rank 0: the root's engine. On any other rank: serve until rank 0 stops, then exit the process
    (a worker has nothing to return to: the command line it shares with rank 0 is the root's).
    stream: rank 0 sends every rank its slices (default: `STREAM_WEIGHTS`, which --stream-weights sets)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    MPI = import_mpi()
    comm = MPI.COMM_WORLD
    comm.Set_errhandler(MPI.ERRORS_RETURN)  # a failed call raises here instead of aborting without a word
    if problem := dispatch.threads_problem(nthreads):
        raise EngineError(problem)
    dispatch.implementation()  # builds the kernels on a first run, before the other ranks wait for them
    try:
        stream = STREAM_WEIGHTS if stream is None else stream
        setup = join_cluster(comm, Path(model_path), max_seq_len, nthreads, buffer_float_type, weights, root_compute,
                             stream, slots)
    except (MpiError, SplitError, EngineError, FormatError):
        if comm.rank == 0:
            raise  # every rank found the same problem: rank 0 names it
        time.sleep(REFUSAL_WAIT_S)  # mpiexec kills every rank once one exits non-zero: let rank 0 speak first
        exit_worker(1)
    if comm.rank == 0:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(1))  # mpi_watch ends rank 0 once it has said why
        return MpiEngine(setup, nthreads, log)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank; rank 0 decides, then says stop
    try:
        serve_rank(setup, nthreads)
    except MpiError as e:
        print(f"error: {setup.statuses[comm.rank].name}: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # not MPI_Finalize, which would wait for the rank that stopped answering
    exit_worker(0)


def exit_worker(code: int) -> None:
    """End a rank other than 0, past typer, which would go on to the root's work (rank 0 speaks for the job).
    SystemExit, not os._exit: mpi4py finalizes MPI at exit, and MPICH's mpiexec took an os._exit right
    after MPI_Finalize for a crash now and then, killing the job."""
    sys.stdout.flush()
    raise SystemExit(code)
