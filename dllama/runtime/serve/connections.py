"""The HTTP connection layer under the app: limits that hold before a request reaches a route.

uvicorn's h11 protocol, with three additions (docs/API.md, "Limits"):
- a deadline for a request's headers: a connection that opens and says nothing, or dribbles half a
  request, is answered 408 and closed after `request_timeout_s` (uvicorn itself waits forever);
- a cap on open connections: a newcomer at the cap closes the connection that has waited longest
  for its client (a stranger's half-sent head or body, an idle keep-alive), or, when every
  connection has a whole request being answered, is answered 503 and closed, so that file
  descriptors never run out and a real client gets in;
- OpenAI error bodies instead of uvicorn's plain-text 400 for bytes that are not HTTP.
The request body's own deadline and size limit are the app's (app.read_body). uvicorn's own
limit_concurrency is not used: it counts half-open connections too and then answers every real
client with a plain-text 503, which is what a stranger holding connections wants.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 16 * MiB
    request_timeout_s: float = 30.0    # to send a request's headers, and then its body
    keep_alive_s: float = 5.0          # an idle keep-alive connection is closed after this
    max_connections: int = 256         # open at once
    max_header_bytes: int = 16 * 1024  # h11's bound on an incomplete request head


class ConnectionTable:
    """The open connections of one server (a protocol per connection), and what the cap did."""

    def __init__(self, max_connections: int):
        self.max_connections = max_connections
        self.open: set = set()
        self.evicted = 0   # closed to make room for a newcomer
        self.refused = 0   # newcomers answered 503: every connection had a request being answered

    def admit(self, newcomer) -> bool:
        if len(self.open) >= self.max_connections:
            waiting = [p for p in self.open if p.evictable()]
            if not waiting:
                self.refused += 1
                return False
            oldest = min(waiting, key=lambda p: p.waiting_since)
            self.open.discard(oldest)
            oldest.transport.close()
            self.evicted += 1
        self.open.add(newcomer)
        return True


def raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP response with an OpenAI error body, written past h11 on a connection about to close."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "server_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def protocol_class(limits: ServeLimits, table: ConnectionTable) -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.waiting_since = time.monotonic()
            self._header_deadline = None
            if not table.admit(self):
                self._close_with(raw_error(503, "Service Unavailable",
                                           f"the server has {table.max_connections} connections with requests in "
                                           "progress; retry later", "too_many_connections"))
                return
            self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            self._disarm_header_deadline()
            table.open.discard(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.awaiting_request():
                self._arm_header_deadline()      # part of a request head: it must complete in time
            else:
                self._disarm_header_deadline()

        def on_response_complete(self) -> None:
            self.waiting_since = time.monotonic()
            super().on_response_complete()       # arms uvicorn's keep-alive timer for the idle wait

        def awaiting_request(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def evictable(self) -> bool:
            """Still waiting for the client: its request's head, or the rest of its body."""
            return self.awaiting_request() or (self.cycle.more_body and not self.cycle.response_started)

        def send_400_response(self, msg: str) -> None:
            self._close_with(raw_error(400, "Bad Request", "the request is not valid HTTP/1.1", "invalid_http"))

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is None and not self.transport.is_closing():
                self._header_deadline = self.loop.call_later(limits.request_timeout_s, self._headers_too_slow)

        def _disarm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.awaiting_request() and not self.transport.is_closing():
                self._close_with(raw_error(408, "Request Timeout", "the request's headers did not arrive within "
                                           f"{limits.request_timeout_s:g} s", "request_timeout"))

        def _close_with(self, response: bytes) -> None:
            self._disarm_header_deadline()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, host: str, port: int):
    """uvicorn's Config for an app from create_app, with the limits it was created with."""
    import uvicorn

    limits: ServeLimits = app.state.limits
    return uvicorn.Config(app, host=host, port=port, http=protocol_class(limits, app.state.connections), ws="none",
                          log_level="error", access_log=False, timeout_keep_alive=limits.keep_alive_s,
                          h11_max_incomplete_event_size=limits.max_header_bytes, timeout_graceful_shutdown=5)
