"""Per-key request rate: a token bucket per API key, in this API process.

Every tenant request takes a token from its key's bucket (app.deps.get_current_tenant, once the key is known
valid); a bucket holds at most `burst` tokens and refills at `per_minute` / 60 a second. An empty bucket is a
429 `rate_limit_exceeded` with `Retry-After`, the seconds until the next token.

The buckets live in the process, not in Redis or the database: the check is a dict lookup and some
arithmetic on the event loop, with no I/O on the path every poller takes, and no shared store whose outage
would stop the API. So the limit is per API process: behind a load balancer spreading a key over N
processes, the key gets up to N times the rate (set the rate to the total wanted divided by N).
"""

from __future__ import annotations

import math
import time

from app.auth import bearer_key, hash_token
from app.errors import RateLimited


class RateLimiter:
    """Token buckets by key hash. Used from the event loop only (an async dependency), so it needs no lock."""

    MAX_KEYS = 10_000

    def __init__(self, per_minute: float, burst: int) -> None:
        self.per_minute = per_minute
        self.burst = float(burst)
        self._per_second = per_minute / 60
        self._buckets: dict[str, tuple[float, float]] = {}  # key hash → (tokens left, monotonic time then)

    def take(self, authorization: str | None) -> None:
        """Spend a token of the header's key (one found valid), or raise RateLimited saying when the next
        one comes. Buckets are kept by the key's hash, as the KeyCache keeps keys: no key is held."""
        if self._per_second <= 0:
            return
        key_hash = hash_token(bearer_key(authorization))
        now = time.monotonic()
        found = self._buckets.get(key_hash)
        if found is None:
            if len(self._buckets) >= self.MAX_KEYS:
                self._forget_full(now)
            tokens = self.burst
        else:
            tokens = min(self.burst, found[0] + (now - found[1]) * self._per_second)
        if tokens < 1:
            self._buckets[key_hash] = (tokens, now)
            retry_after = max(1, math.ceil((1 - tokens) / self._per_second))
            raise RateLimited(
                f"Rate limit reached for this API key on requests per minute: limit {self.per_minute:g}, "
                f"burst {self.burst:g}. Try again in {retry_after}s.",
                retry_after=retry_after,
            )
        self._buckets[key_hash] = (tokens - 1, now)

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled: a full bucket is what an unknown key starts with. If every
        bucket is still in use, drop them all, which gives those keys a fresh burst: a bound on memory is
        worth more than that."""
        self._buckets = {
            key: (tokens, then)
            for key, (tokens, then) in self._buckets.items()
            if tokens + (now - then) * self._per_second < self.burst
        }
        if len(self._buckets) >= self.MAX_KEYS:
            self._buckets.clear()
