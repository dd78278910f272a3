"""Names the rank that died: `python -m dllama.runtime.distributed.mpi_watch ROOT_PID ROOT_NAME` (started by rank 0).

mpiexec (MPICH's hydra) SIGKILLs every rank the moment one dies, rank 0 included, so rank 0 cannot
be relied on to say which one it was. Rank 0 therefore starts this process in its own session,
outside the job, and hands it one TCP connection per other rank (their "lifelines", inherited
file descriptors; stdin carries "FD<TAB>rank R on HOST (pid P)" lines, then an empty line). A
killed rank's kernel closes its lifeline at once: this process prints one `error:` line naming
it, then ends rank 0 (SIGTERM, then SIGKILL) in case mpiexec has not. Rank 0's own death (its
pipe closes and no lifeline closes within 0.5 s) names rank 0; where mpiexec ends the other ranks
within that time (it usually does) they are named instead. A host that vanishes
without closing anything is noticed by TCP keepalive (~25 s). "quiet" on stdin (rank 0 ends the job
normally, before it tells the ranks to stop, or after it named a rank itself) ends it silently.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

from dllama.runtime.distributed.protocol import KEEPALIVE_S

ROOT_GRACE_S = 1.0  # after SIGTERM, before SIGKILL


def read_table(stdin) -> dict[int, str]:
    table = {}
    for line in iter(stdin.readline, b""):
        if not line.strip():
            break
        fd, name = line.decode().rstrip("\n").split("\t", 1)
        table[int(fd)] = name
    return table


def keepalive(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = KEEPALIVE_S
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


def lost(socks: dict[socket.socket, str], timeout: float | None) -> list[str]:
    """Names of ranks whose lifeline closed (or broke) within `timeout`."""
    ready, _, _ = select.select(list(socks), [], [], timeout)
    names = []
    for sock in ready:
        try:
            gone = not sock.recv(1)
        except OSError:
            gone = True
        if gone:
            names.append(socks.pop(sock))
    return names


def end_root(pid: int) -> None:
    for sig, pause in ((signal.SIGTERM, ROOT_GRACE_S), (signal.SIGKILL, 0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


def report_root(root: str) -> None:
    os.write(2, (f"error: {root} died (killed, or out of memory) and the job ended with it: check that board "
                 "(dmesg for the out-of-memory killer, power), then start mpiexec again\n").encode())


def report(names: list[str]) -> None:
    who = names[0] if len(names) == 1 else ", ".join(names)
    os.write(2, (f"error: {who} died or lost its connection to rank 0; the job cannot go on without its share of "
                 "the model: check that board (dmesg for the out-of-memory killer, power, network), then start "
                 "mpiexec again\n").encode())


def main() -> None:
    root_pid = int(sys.argv[1])
    root_name = sys.argv[2] if len(sys.argv) > 2 else "rank 0"
    stdin = sys.stdin.buffer
    socks = {keepalive(fd): name for fd, name in read_table(stdin).items()}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for rank 0, which then tells us "quiet"
    while socks:
        ready, _, _ = select.select([stdin, *socks], [], [])
        if stdin in ready:
            if stdin.readline().strip() == b"quiet":
                stdin.read()  # the ranks are stopping and closing their lifelines: wait until rank 0 is done
                return
            # rank 0 ended without a word: killed by mpiexec because a rank died (whose lifeline closes
            # around the same time; on one machine its close may even be seen after rank 0's), or it died
            # itself while no lifeline closes
            names = lost(socks, 0.5)
            if names:
                report(names)
            else:
                report_root(root_name)
            return
        names = lost(socks, 0)  # mpiexec's clean-up closes the others' lifelines only after this one's
        if names:
            report(names)
            end_root(root_pid)
            return

if __name__ == "__main__":
    main()
