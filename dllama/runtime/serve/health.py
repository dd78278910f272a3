"""Whether the cluster behind a root engine is still there, asked without disturbing it."""
from __future__ import annotations

import contextlib
import socket
from typing import Callable


def cluster_fault_types() -> tuple[type[BaseException], ...]:
    """Errors that mean the cluster is gone (a lost socket, a worker that vanished), not a bad request."""
    faults: tuple[type[BaseException], ...] = (OSError,)
    with contextlib.suppress(ImportError):
        from dllama.runtime.distributed.protocol import ProtocolError
        from dllama.runtime.distributed.root import WorkerError
        faults += (ProtocolError, WorkerError)
    return faults


def worker_probe(engine) -> Callable[[], str | None] | None:
    """For a root engine with worker links: a probe that names a worker whose connection closed.

    A dead worker's socket reads as end-of-file at once (the kernel closes it), so /health can
    report the cluster down while idle, before a request runs into it.
    """
    links = getattr(engine, "links", None)
    if not links:
        return None

    def probe() -> str | None:
        for link in links:
            reason = _link_problem(link)
            if reason:
                return f"{link.name} {reason}"
        return None

    return probe


def worker_states(engine) -> list[dict] | None:
    """Each worker of a root engine as /health lists it (the chat page shows them), or None without workers."""
    links = getattr(engine, "links", None)
    if not links:
        return None
    states = []
    for link in links:
        problem = _link_problem(link)
        state = {"address": f"{link.address[0]}:{link.address[1]}", "node": link.node,
                 "status": "down" if problem else "ok"}
        if problem:
            state["error"] = problem
        states.append(state)
    return states


def _link_problem(link) -> str | None:
    if link.sock is None:
        return "is not connected"
    return _closed_reason(link.sock)


def _closed_reason(sock: socket.socket) -> str | None:
    # peek on a duplicate with a zero timeout: never blocks, never consumes the engine's bytes.
    # A socket with a timeout is already non-blocking underneath, so the shared flag is unchanged.
    if sock.gettimeout() is None:
        return None
    try:
        with sock.dup() as peek:
            peek.settimeout(0.0)
            if peek.recv(1, socket.MSG_PEEK) == b"":
                return "closed the connection"
    except BlockingIOError:
        return None
    except OSError as e:
        return f"is unreachable ({e.strerror or e})"
    return None
