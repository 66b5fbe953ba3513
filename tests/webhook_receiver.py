"""A real HTTP endpoint for webhook tests, and the receiver's side of Standard Webhooks: verifying a
signature as a tenant would, written from the specification (not with app.webhooks.signing)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Answers each POST with the next of `statuses` (the last one from then on), after `delay` seconds, and
    keeps what it got (as it arrives)."""

    url: str
    statuses: list[int]
    delay: float = 0
    received: list[Received] = field(default_factory=list)

    def answer(self, request: Received) -> int:
        self.received.append(request)
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


@contextmanager
def receiving(*statuses: int, delay: float = 0, tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A `Receiver` served over HTTP (HTTPS with the server context `tls`) on a free loopback port from a
    thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {name.lower(): value for name, value in self.headers.items()}
            status = receiver.answer(Received(headers, body))
            time.sleep(receiver.delay)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    scheme = "https" if tls else "http"
    receiver = Receiver(f"{scheme}://127.0.0.1:{server.server_port}/hook", list(statuses or (200,)), delay)
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def signature_is_valid(secret: str, request: Received) -> bool:
    """The check a receiver makes: HMAC-SHA256, keyed with the base64 after `whsec_`, of
    `{webhook-id}.{webhook-timestamp}.{body}`, against each `v1,<base64>` of `webhook-signature`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = (
        f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode() + request.body
    )
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, given) for given in request.headers["webhook-signature"].split())


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 20) -> T:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.05)
    return result
