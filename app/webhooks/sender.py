"""The API's webhook sender: a daemon thread that claims due deliveries (app.repositories.webhooks.claim_due,
safe with several API processes) as SLOTS free up, posts each signed (app.webhooks.signing) to the address
its host resolves to now, checked again (app.webhooks.url_guard), and records the outcome: delivered on a
2xx; otherwise due again after the next wait of PHITUNE_WEBHOOK_RETRY_SECONDS (varied ±20%, so that retries
of many deliveries spread out), or failed once those are used up. Redirects are not followed (a 3xx is a
failure). An attempt ends PHITUNE_WEBHOOK_TIMEOUT_SECONDS after it started, and a tenant holds at most
PER_TENANT slots: endpoints that hang or trickle their answer delay their own tenant's deliveries only.

Deliveries are rows: a delivery whose attempt never got its outcome recorded (the API died mid-post) is due
again once its claim lapses, with the same `webhook-id`, so every event is delivered at least once."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import httpx
from sqlalchemy import Row

from app.config import Settings
from app.db import session_scope
from app.models import WebhookDelivery
from app.models.base import now
from app.repositories import webhooks
from app.webhooks import signing, url_guard

log = logging.getLogger(__name__)
SLOTS = 8  # deliveries posted in parallel by one API process
PER_TENANT = 2  # of those, the most one tenant's deliveries may hold
MAX_ADDRESSES = 3  # of a host's addresses, those an attempt tries, the next when one refuses the connection
JITTER = 0.2
MAX_ERROR_CHARS = 500  # webhook_deliveries.last_error
KEEP_SETTLED_SECONDS = 30 * 86400  # how long a delivered or failed delivery stays in the log
PRUNE_SECONDS = 3600  # how often those older are deleted


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: the endpoint's HTTP status, or why there was none."""

    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# A request's URL, extra headers and httpx extensions.
Target = tuple[httpx.URL, dict[str, str], dict[str, str]]


def pinned(url: httpx.URL, address: url_guard.IPAddress) -> Target:
    """The request to `url` sent to `address` (connecting to the address that was checked, not to whatever
    the name resolves to next): the URL with the address as its host, the name in `Host` and, over TLS,
    as the server name (SNI) the certificate is checked against."""
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if url.scheme == "https" else {}
    return url.copy_with(host=str(address)), {"host": url.netloc.decode("ascii")}, extensions


class Deadline:
    """Ends an attempt `seconds` after it started however its endpoint trickles the answer (httpx's timeout
    bounds each read, not the exchange): it shuts the attempt's socket, found through httpcore's `trace`
    extension, which fails the read in progress."""

    CONNECTED = ("connection.connect_tcp.complete", "connection.start_tls.complete")

    def __init__(self, seconds: float) -> None:
        self.passed = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event in self.CONNECTED:  # TLS wraps the TCP socket in a new one
            with self._lock:
                self._socket = info["return_value"].get_extra_info("socket")
                if self.passed:
                    self._shut()

    def _expire(self) -> None:
        with self._lock:
            self.passed = True
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also for a TLS one: its own would drop its TLS state under
                # the read in progress.
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)


class WebhookSender:
    """Started and stopped with the API (app.main's lifespan)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.resolved_database_url
        # An attempt takes a resolution (within the resolver's own timeouts, 30 s at most as configured by
        # default) and up to the timeout for each of at most MAX_ADDRESSES addresses; only once this has
        # passed without an outcome recorded may another sender try it again.
        self.claim_seconds = (MAX_ADDRESSES + 1) * settings.webhook_timeout_seconds + 30
        self._pool = ThreadPoolExecutor(SLOTS, thread_name_prefix="webhook-post")
        self._in_flight: Counter[str] = Counter()  # posts running, by tenant
        self._lock = threading.Lock()
        self._freed = threading.Event()  # a slot freed up (or the sender is stopping)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)

    @cached_property
    def client(self) -> httpx.Client:
        """Made on first use: its TLS context takes ~20 ms to build, which an app that never sends (most
        that tests make) should not pay. No proxy from the environment: it would resolve the host itself,
        past the address check. No connection kept alive: one is pooled by address, and another host at that
        address must not reuse a TLS connection whose certificate was checked for the first."""
        return httpx.Client(
            timeout=self.settings.webhook_timeout_seconds,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; a post in flight ends by its deadline, and one cut off by the process's exit is
        sent again once its claim lapses."""
        self._stop.set()
        self._freed.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def dispatch(self) -> list[Future[None]]:
        """Claim due deliveries for the free slots, at most one per tenant and none of a tenant that holds
        PER_TENANT slots already, and start their attempts. Returns the attempts started."""
        with self._lock:
            free = SLOTS - self._in_flight.total()
            busy = [tenant for tenant, count in self._in_flight.items() if count >= PER_TENANT]
        if free <= 0:
            return []
        started = time.time()
        with session_scope(self.database_url) as session:
            if not webhooks.any_due(session, started):
                return []
        with session_scope(self.database_url) as session:
            claimed = webhooks.claim_due(session, started, started + self.claim_seconds, free, busy)
        with self._lock:
            self._in_flight.update(row.tenant_id for row in claimed)
        return [self._pool.submit(self.attempt, row) for row in claimed]

    def attempt(self, row: Row) -> None:
        """Post a claimed delivery and record the outcome, then free its slot."""
        try:
            outcome = self.post(row)
            with session_scope(self.database_url) as session:
                webhooks.record_attempt(
                    session, row.id, row.attempts, self.outcome_values(row.attempts, outcome)
                )
        except Exception:
            log.exception(
                "webhook delivery %s: no outcome recorded; sent again once its claim lapses", row.id
            )
        finally:
            with self._lock:
                self._in_flight[row.tenant_id] -= 1
                if not self._in_flight[row.tenant_id]:
                    del self._in_flight[row.tenant_id]
            self._freed.set()

    def post(self, row: Row) -> Outcome:
        """One attempt: POST the delivery's body, signed, to its URL, reached at an address of its host that
        was checked just now (the next one if that one refuses the connection)."""
        try:
            url = url_guard.parse(row.url)
            targets: list[Target] = [(url, {}, {})]
            if not self.settings.webhook_allow_private_urls:
                addresses = url_guard.public_addresses(url)[:MAX_ADDRESSES]
                targets = [pinned(url, address) for address in addresses]
            for target in targets[:-1]:
                try:
                    status = self.send(row, *target)
                    break
                except httpx.ConnectError:
                    continue
            else:
                status = self.send(row, *targets[-1])
        except url_guard.UrlRefused as refused:
            return Outcome(None, f"refused: {refused}"[:MAX_ERROR_CHARS])
        except httpx.TimeoutException:
            return Outcome(None, f"timed out after {self.settings.webhook_timeout_seconds:g} s")
        except httpx.HTTPError as error:
            return Outcome(None, f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])
        return Outcome(status, None if 200 <= status < 300 else f"answered HTTP {status}")

    def send(self, row: Row, url: httpx.URL, headers: dict[str, str], extensions: dict[str, str]) -> int:
        """The status the endpoint answers within the timeout; its body is never read."""
        signed = {**headers, **signing.headers(row.secret, row.id, int(time.time()), row.body)}
        with Deadline(self.settings.webhook_timeout_seconds) as deadline:
            try:
                with self.client.stream(
                    "POST",
                    url,
                    content=row.body.encode(),
                    headers=signed,
                    extensions={**extensions, "trace": deadline.trace},
                ) as response:
                    return response.status_code
            except httpx.HTTPError:
                if deadline.passed:
                    raise httpx.TimeoutException("the attempt's deadline passed") from None
                raise

    def outcome_values(self, attempt: int, outcome: Outcome) -> dict[str, Any]:
        """The delivery's columns after attempt `attempt` (1 for the first) ended as `outcome`."""
        values: dict[str, Any] = {"last_status_code": outcome.status_code, "last_error": outcome.error}
        if outcome.delivered:
            return {**values, "status": WebhookDelivery.DELIVERED, "delivered_at": now()}
        waits = self.settings.webhook_retry_seconds
        if attempt > len(waits):
            return {**values, "status": WebhookDelivery.FAILED}
        wait = waits[attempt - 1] * random.uniform(1 - JITTER, 1 + JITTER)
        return {**values, "next_attempt_at": time.time() + wait}

    def prune(self) -> None:
        with session_scope(self.database_url) as session:
            forgotten = webhooks.forget_settled(session, int(time.time() - KEEP_SETTLED_SECONDS))
        if forgotten:
            log.info(
                "deleted %d webhook deliveries settled over %d days ago",
                forgotten,
                KEEP_SETTLED_SECONDS // 86400,
            )

    def _run(self) -> None:
        pruned = -math.inf
        while not self._stop.is_set():
            self._freed.clear()
            try:
                if time.monotonic() - pruned > PRUNE_SECONDS:
                    pruned = time.monotonic()  # not again before its time, should it fail
                    self.prune()
                started = self.dispatch()
            except Exception:
                log.exception("webhook sender round failed; the next one tries again")
                started = []
            if not started:  # else more may be due at once, for the slots still free
                self._freed.wait(self.settings.webhook_poll_seconds)
