"""GET /metrics: Prometheus text of request counts and latencies, jobs by status and unsent job messages."""

from __future__ import annotations

import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from app.config import Settings
from app.db import session_scope
from app.models import JobStatus
from app.repositories import jobs as job_rows


class StateCollector:
    """Reads job counts from SQL at scrape time, so every API replica reports the same truth."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self):
        with session_scope(self.settings.resolved_database_url) as session:
            counts = job_rows.counts_by_status(session)
            unsent = job_rows.unsent_count(session)
        jobs = GaugeMetricFamily("phitune_jobs", "Fine-tuning jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily(
            "phitune_outbox_unsent", "Job messages not yet sent to the broker", value=unsent
        )


def route_template(scope: dict) -> str:
    """`/v1/fine_tuning/jobs/ftjob-1` → `/v1/fine_tuning/jobs/{fine_tuning_job_id}`, from the matched path
    parameters (routers included with a prefix do not expose the full template)."""
    if scope.get("route") is None:
        return "unmatched"
    names = {str(value): name for name, value in (scope.get("path_params") or {}).items()}
    return "/".join(f"{{{names[part]}}}" if part in names else part for part in scope["path"].split("/"))


class RequestMetrics:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which would get between a streaming response and the
    client's disconnect) counting and timing each request by route template at its first response byte."""

    def __init__(self, app, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def observe_start(message) -> None:
            if message["type"] == "http.response.start":
                route = route_template(scope)  # the router has filled in route and path_params by now
                self.requests.labels(scope["method"], route, str(message["status"])).inc()
                self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, observe_start)


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Request counts and latencies by route template (not raw path, which would explode the label set),
    and the job state read from SQL, at GET /metrics."""
    registry = CollectorRegistry()
    registry.register(StateCollector(settings))
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
