"""GET /metrics: Prometheus text of request counts and latencies, jobs by status, unsent job messages and
pending webhook deliveries."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from app.broker import make_celery, queue_routes
from app.config import Settings
from app.db import session_scope
from app.jobs.outbox import queued_messages
from app.models import JobStatus
from app.repositories import jobs as job_rows
from app.repositories import webhooks

log = logging.getLogger(__name__)


class StateCollector:
    """Reads job counts from SQL at scrape time, so every API replica reports the same truth."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self):
        with session_scope(self.settings.resolved_database_url) as session:
            counts = job_rows.counts_by_status(session)
            unsent = job_rows.unsent_count(session)
            pending_webhooks = webhooks.pending_count(session)
        jobs = GaugeMetricFamily("phitune_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily(
            "phitune_outbox_unsent", "Job messages not yet sent to the broker", value=unsent
        )
        yield GaugeMetricFamily(
            "phitune_webhook_deliveries_pending",
            "Webhook deliveries not yet delivered nor given up on",
            value=pending_webhooks,
        )


class QueueCollector:
    """Each training queue's length in the broker at scrape time (`queue` label): messages sent that no worker
    has taken yet. An unreachable broker leaves the gauge out of that scrape (/readyz says why) rather than
    fail /metrics."""

    def __init__(self, settings: Settings) -> None:
        self.celery = make_celery(settings)

    def collect(self):
        depth = GaugeMetricFamily(
            "phitune_training_queue_depth",
            "Training and export messages waiting in the broker",
            labels=["queue"],
        )
        try:
            for queue in queue_routes(self.celery).queues:
                depth.add_metric([queue], queued_messages(self.celery, queue))
        except Exception as exc:
            log.warning("could not read the training queues' lengths: %s", exc)
            return
        yield depth


# Methods outside this set (any token is a valid HTTP method) are counted as "other".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"


def route_template(scope: dict) -> str:
    """`/v1/fine_tuning/jobs/ftjob-1` → `/v1/fine_tuning/jobs/{fine_tuning_job_id}`; every path no route
    matched → "unmatched". The matched route's own template lacks the prefix its router was included with
    (`/v1`), so that prefix is what the request's path has before the route's part; a route part that does not
    end the path (never expected) is "unmatched" too, so no label is ever built from the raw path."""
    route = scope.get("route")
    path_format: str | None = getattr(route, "path_format", None)
    if route is None or path_format is None:
        return UNMATCHED
    params = scope.get("path_params") or {}
    convertors = getattr(route, "param_convertors", {})
    try:
        matched = path_format.format(
            **{name: convertors[name].to_string(value) for name, value in params.items()}
        )
    except (KeyError, IndexError, ValueError, AssertionError):
        return UNMATCHED
    path: str = scope["path"]
    if not path.endswith(matched):
        return UNMATCHED
    return path[: len(path) - len(matched)] + path_format


class RequestMetrics:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which would get between a streaming response and the
    client's disconnect) counting and timing each request by route template at its first response byte."""

    # A fuse: the app has a few dozen route templates, so a label past this many means a template was built
    # wrongly, and it is counted as "unmatched" rather than grow the series without end.
    MAX_ROUTES = 500

    def __init__(self, app, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency
        self.routes: set[str] = {UNMATCHED}

    def route_label(self, scope) -> str:
        route = route_template(scope)  # the router has filled in route and path_params by now
        if route not in self.routes:
            if len(self.routes) >= self.MAX_ROUTES:
                return UNMATCHED
            self.routes.add(route)
        return route

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def observe_start(message) -> None:
            if message["type"] == "http.response.start":
                route = self.route_label(scope)
                method = scope["method"] if scope["method"] in METHODS else "other"
                self.requests.labels(method, route, str(message["status"])).inc()
                self.latency.labels(method, route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, observe_start)


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Request counts and latencies by route template (not raw path, which would explode the label set),
    and the job state read from SQL, at GET /metrics. No label comes from what a request says: not its path,
    not a method outside METHODS, not its tenant (there are no per-tenant labels)."""
    registry = CollectorRegistry()
    registry.register(StateCollector(settings))
    registry.register(QueueCollector(settings))
    requests = Counter(
        "phitune_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "phitune_http_request_duration_seconds",
        "Time to the response's first byte",
        ["method", "route"],
        registry=registry,
    )
    app.add_middleware(RequestMetrics, requests=requests, latency=latency)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
