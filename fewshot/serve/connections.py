"""Slow and excess connections: uvicorn's HTTP/1.1 protocol with read timeouts and a connection cap.

uvicorn waits for a request's headers and body as long as the client likes, so a few hundred
half-sent requests (no API key needed: the key is a header) hold that many descriptors for ever. Here
each connection must deliver a request's headers within ``header_timeout`` seconds of opening (or of
the previous response), and must not pause longer than ``body_timeout`` seconds while sending a
body; otherwise it gets a 408 and is closed. Connections beyond ``max_connections`` are closed as soon
as they are accepted, so descriptors stay bounded and the connections already open keep being served.
``listen`` binds the port before anything else runs, so a busy port is one clear error.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# Descriptors the process needs besides its connections: the registry's files, the model, logs.
SPARE_DESCRIPTORS = 64


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a header deadline, a body idle timeout and a cap on open connections.
    Subclass it with ``guarded_protocol(...)`` to set the limits."""

    header_timeout = 10.0
    body_timeout = 30.0
    max_connections = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_for = ""
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.abort()  # refused before reading a byte: frees the descriptor at once
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """(Re)arm the timer for what the client owes now: headers (one deadline for all of them),
        the rest of a body (restarted by every chunk), or nothing while the service works."""
        state = self.conn.their_state
        if self.transport.is_closing():
            self._stop_timer()
        elif state is h11.IDLE:
            if self._waiting_for != "headers":
                self._start_timer("headers", self.header_timeout)
        elif state is h11.SEND_BODY:
            self._start_timer("body", self.body_timeout)
        else:
            self._stop_timer()

    def _start_timer(self, what: str, seconds: float) -> None:
        self._stop_timer()
        self._waiting_for = what
        self._timer = self.loop.call_later(seconds, self._too_slow, what, seconds)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._waiting_for = None, ""

    def _too_slow(self, what: str, seconds: float) -> None:
        self._timer, self._waiting_for = None, ""
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            wait = "the request's headers took" if what == "headers" else "the request body paused for"
            self.transport.write(_timeout_response(f"{wait} more than {seconds:g} s; send requests promptly"))
        self.transport.close()


def _timeout_response(message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    return head + body


def guarded_protocol(*, header_timeout: float, body_timeout: float, max_connections: int) -> type[H11Protocol]:
    """A ``GuardedH11Protocol`` class with these limits, for ``uvicorn.Config(http=...)``."""
    for name, value in (("header_timeout", header_timeout), ("body_timeout", body_timeout),
                        ("max_connections", max_connections)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": float(header_timeout), "body_timeout": float(body_timeout),
        "max_connections": int(max_connections)})


def ensure_descriptors(max_connections: int) -> None:
    """Raise the process's soft limit on open files so that ``max_connections`` fit; ValueError if
    the hard limit is too low (then lower --max-connections or raise ``ulimit -Hn``)."""
    needed = max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(f"--max-connections {max_connections} needs {needed} open files but this process may "
                             f"open at most {hard}; lower --max-connections or raise the limit (ulimit -n)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``; a clear OSError if that address is taken or not allowed."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP)[0]
        # proto=IPPROTO_TCP, as asyncio's own servers have: only then does it set TCP_NODELAY on each
        # connection (without it, Nagle's algorithm adds ~40 ms to every response).
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as e:
        hint = ("another program (another fewshot serve?) is listening there; pick another --port"
                if e.errno == errno.EADDRINUSE else "pick another --host or --port")
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise OSError(f"cannot listen on {host}:{port}: {reason}; {hint}") from None
