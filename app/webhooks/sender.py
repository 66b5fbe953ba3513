"""The API's webhook sender: a daemon thread that claims due deliveries (app.repositories.webhooks.claim_due,
safe with several API processes), posts each signed (app.webhooks.signing) to the address its host resolves
to now, checked again (app.webhooks.url_guard), and records the outcome: delivered on a 2xx; otherwise due
again after the next wait of PHITUNE_WEBHOOK_RETRY_SECONDS (varied ±20%, so that retries of many deliveries
spread out), or failed once those are used up. Redirects are not followed (a 3xx is a failure).

Deliveries are rows: a delivery whose attempt never got its outcome recorded (the API died mid-post) is due
again once its claim lapses, with the same `webhook-id`, so every event is delivered at least once."""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
BATCH = 8  # deliveries claimed, and posted in parallel, at once
JITTER = 0.2
MAX_ERROR_CHARS = 500  # webhook_deliveries.last_error


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


class WebhookSender:
    """Started and stopped with the API (app.main's lifespan)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.resolved_database_url
        # An attempt may take a resolution plus a connect, a write and a read of up to the timeout each;
        # only once this has passed without an outcome recorded may another sender try it again.
        self.claim_seconds = 4 * settings.webhook_timeout_seconds + 30
        self._pool = ThreadPoolExecutor(BATCH, thread_name_prefix="webhook-post")
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
        """Stop polling; a post in flight is not waited for long (its claim lapses and it is sent again)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run_once(self) -> int:
        """Claim up to BATCH due deliveries, post them in parallel and record each outcome. Returns how many
        were claimed."""
        started = time.time()
        with session_scope(self.database_url) as session:
            if not webhooks.any_due(session, started):
                return 0
        with session_scope(self.database_url) as session:
            claimed = webhooks.claim_due(session, started, started + self.claim_seconds, BATCH)
        for row, outcome in zip(claimed, self._pool.map(self.post, claimed), strict=True):
            with session_scope(self.database_url) as session:
                webhooks.record_attempt(
                    session, row.id, row.attempts, self.outcome_values(row.attempts, outcome)
                )
        return len(claimed)

    def post(self, row: Row) -> Outcome:
        """One attempt: POST the delivery's body, signed, to its URL, reached at an address of its host that
        was checked just now (the next one if that one refuses the connection)."""
        try:
            url = url_guard.parse(row.url)
            targets: list[Target] = [(url, {}, {})]
            if not self.settings.webhook_allow_private_urls:
                targets = [pinned(url, address) for address in url_guard.public_addresses(url)]
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
        """The status the endpoint answers; its body is never read."""
        signed = {**headers, **signing.headers(row.secret, row.id, int(time.time()), row.body)}
        with self.client.stream(
            "POST", url, content=row.body.encode(), headers=signed, extensions=extensions
        ) as response:
            return response.status_code

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

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self.run_once()
            except Exception:
                log.exception("webhook sender round failed; the next one tries again")
                claimed = 0
            if claimed < BATCH:  # a full batch: more may be due at once
                self._stop.wait(self.settings.webhook_poll_seconds)
