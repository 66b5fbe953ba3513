"""The worker's requests against the API's own routes.

Every call of `worker.client` is sent through a transport that records it; each recorded request must reach a
route of the API app (`app.main.create_app`) with that method and path, and its path, query and header
parameters and its JSON body must validate against what that route declares (the request models of
`app.internal.contracts`, which refuse unknown fields). Nothing here restates the API's schema.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import Headers, QueryParams
from starlette.routing import Match

from app.adapter_format import FORMATS
from app.config import Settings
from app.internal.contracts import LeaseReply, StateReceipt
from app.main import create_app
from tests.worker.test_client import CLAIM
from worker.client import ApiClient, AttemptClient
from worker.tasks import ApiReporter, report_failure

INTERNAL = "/internal/v1"
# One reply every POST and PUT of the worker can parse (a lease, a stored resume state, a job status).
REPLY = {
    **LeaseReply(cancel_requested=False).model_dump(),
    **StateReceipt(id="state-1", step=10, sha256="0" * 64, bytes=3).model_dump(),
    "status": "running",
}
# What the recipe reports, a diverged run's non-finite losses included (see worker.recipe).
METRICS = {
    "step": 10,
    "total_steps": 20,
    "epoch": 0.5,
    "train_loss": float("nan"),
    "learning_rate": 2e-4,
    "tokens_per_second": 1234.5,
    "eval_loss": float("inf"),
    "eval_mean_token_accuracy": 0.5,
}
CHECKPOINT_METRICS = {
    "train_loss": 1.5,
    "train_mean_token_accuracy": 0.4,
    "valid_loss": float("nan"),
    "valid_mean_token_accuracy": None,
}


@pytest.fixture(scope="module")
def api_routes(tmp_path_factory: pytest.TempPathFactory) -> list[APIRoute]:
    """The routes of the API app as it is served (no database is opened to build it)."""
    data_dir = tmp_path_factory.mktemp("api")
    settings = Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'unused.db'}",
        broker_url="memory://",
        worker_token="test-worker-token",
    )
    return served_routes(create_app(settings))


def served_routes(app: FastAPI) -> list[APIRoute]:
    """The API routes of `app` with their full paths, those of included routers too."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # an older FastAPI copies the routes of included routers into app.routes
        return [route for route in app.routes if isinstance(route, APIRoute)]
    # A RouteContext stands for the route as served (full path, matches, dependant, body_field).
    return [
        context for context in iter_route_contexts(app.routes) if isinstance(context.original_route, APIRoute)
    ]


def api_route(request: httpx.Request, routes: list[APIRoute]) -> tuple[APIRoute, dict[str, Any]]:
    """The route of the API that serves `request`, with its path parameters; AssertionError when none does."""
    where = f"{request.method} {request.url.path}"
    assert request.url.path.startswith(INTERNAL + "/"), f"{where}: a worker calls only {INTERNAL}"
    scope = {"type": "http", "path": request.url.path, "root_path": "", "method": request.method}
    partial = None
    for route in routes:
        match, child_scope = route.matches(scope)
        if match == Match.FULL:
            return route, child_scope["path_params"]
        if match == Match.PARTIAL:
            partial = route
    if partial is not None:
        raise AssertionError(f"{where}: the API serves {partial.path} with {sorted(partial.methods)} only")
    raise AssertionError(f"{where}: no route of the API serves this path")


def declared(dependant: Dependant, kind: str) -> list[Any]:
    """The parameters of one `kind` (path_params, query_params, header_params) that a route or any of its
    dependencies declares."""
    return [*getattr(dependant, kind), *(p for sub in dependant.dependencies for p in declared(sub, kind))]


def check_against_api(request: httpx.Request, routes: list[APIRoute]) -> APIRoute:
    """Fail unless `request` is one the API accepts, as far as its declared schema says; returns the route."""
    route, path_params = api_route(request, routes)
    where = f"{request.method} {request.url.path} ({route.name})"
    query = QueryParams(request.url.query.decode())
    headers = Headers(raw=request.headers.raw)
    problems = [
        *request_params_to_args(declared(route.dependant, "path_params"), path_params)[1],
        *request_params_to_args(declared(route.dependant, "query_params"), query)[1],
        *request_params_to_args(declared(route.dependant, "header_params"), headers)[1],
    ]
    known_query = {param.alias for param in declared(route.dependant, "query_params")}
    problems += [f"unknown query parameter {name!r}" for name in sorted(set(query) - known_query)]
    if route.body_field is not None:
        model = route.body_field.field_info.annotation
        try:
            TypeAdapter(model).validate_json(request.content or b"null")
        except ValidationError as invalid:
            problems += invalid.errors(include_url=False)
    elif request.content:
        is_json = request.headers.get("content-type", "").startswith("application/json")
        if is_json or route.dependant.request_param_name is None:
            problems.append("a body sent to a route that declares none (and does not stream one)")
    assert not problems, f"{where}: the API refuses the worker's request: {problems}"
    return route


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[tuple[ApiClient, list[httpx.Request]]]:
    """A worker API client whose transport records every request and answers each as the API would."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/claim"):
            return httpx.Response(200, json=CLAIM.model_dump())
        if request.method == "GET":
            return httpx.Response(200, content=b"file bytes")
        return httpx.Response(200, json=REPLY)

    api = ApiClient("http://api.invalid", "test-worker-token", transport=httpx.MockTransport(handler))
    yield api, seen
    api.close()


def worker_calls(api: ApiClient, tmp_path: Path) -> dict[str, Callable[[], object]]:
    """Every call the worker makes, by client method, with arguments as worker.tasks passes them."""
    archive = tmp_path / "archive.tar"
    archive.write_bytes(b"tar bytes")
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    attempt = api.attempt(CLAIM)
    reporter = ApiReporter(attempt, CLAIM.heartbeat_seconds)  # builds the events as training does

    def post_events() -> None:
        reporter.on_metrics(METRICS)
        reporter.message("Resumed from step 10 (attempt 2)")
        reporter.message("Checkpoint skipped", level="warn", data={"step": 10, "loss": float("-inf")})
        attempt.post_events([])

    def upload_adapter() -> None:
        for fmt in FORMATS:
            attempt.upload_adapter(archive, fmt)
            attempt.upload_adapter(archive, fmt, step=10)

    def complete() -> None:  # each outcome worker.tasks.train reports
        attempt.complete("requeued", reason="the worker is shutting down")
        attempt.complete("paused", trained_tokens=100)
        attempt.complete("requeued", trained_tokens=100, reason="the worker is shutting down")
        attempt.complete("failed", error="The attempt ran past the job time limit (60 s)")
        attempt.complete("cancelled", trained_tokens=100)
        attempt.complete("succeeded", trained_tokens=100, shipped_step=None, peft_unavailable_reason=None)
        attempt.complete("succeeded", trained_tokens=100, shipped_step=10, peft_unavailable_reason="no PEFT")
        report_failure(attempt, "x" * 5000)

    return {
        "claim": lambda: api.claim(CLAIM.job_id),
        "download_file": lambda: attempt.download_file(CLAIM.training_file, tmp_path / "train.jsonl"),
        "download_resume_state": lambda: attempt.download_resume_state("state-1", tmp_path / "state.tar"),
        "download_init_adapter": lambda: attempt.download_init_adapter(tmp_path / "init_from.tar.gz"),
        "heartbeat": attempt.heartbeat,
        "post_events": post_events,
        "upload_resume_state": lambda: attempt.upload_resume_state(archive, 10, sha256),
        "upload_adapter": upload_adapter,
        "publish_checkpoint": lambda: attempt.publish_checkpoint(10, CHECKPOINT_METRICS),
        "complete": complete,
    }


def client_methods() -> set[str]:
    """The public calls of the worker's API client (not its plumbing)."""
    return {
        name
        for cls in (ApiClient, AttemptClient)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in ("attempt", "close")
    }


def test_every_request_of_the_worker_validates_against_the_api_schema(
    recorded: tuple[ApiClient, list[httpx.Request]], api_routes: list[APIRoute], tmp_path: Path
) -> None:
    api, seen = recorded
    calls = worker_calls(api, tmp_path)
    assert set(calls) == client_methods(), (
        "a call of worker.client is not driven here: add it to worker_calls"
    )
    served = set()
    for name, call in calls.items():
        before = len(seen)
        call()
        assert len(seen) > before, f"{name} sent nothing"
        for request in seen[before:]:
            served.add(check_against_api(request, api_routes).path)
    jobs_routes = {route.path for route in api_routes if route.path.startswith(f"{INTERNAL}/jobs/")}
    assert served == jobs_routes, f"routes for workers that the worker never calls: {jobs_routes - served}"


def test_non_finite_metrics_are_sent_as_null(recorded: tuple[ApiClient, list[httpx.Request]]) -> None:
    """JSON has no NaN, and httpx refuses to encode one: a diverged run must still report its steps."""
    api, seen = recorded
    attempt = api.attempt(CLAIM)
    attempt.post_events([{"seq": 1, "type": "metrics", "message": "Step 1/2", "data": METRICS}])
    attempt.publish_checkpoint(10, CHECKPOINT_METRICS)
    events, checkpoint = (json.loads(request.content) for request in seen)
    assert events["events"][0]["data"] == {**METRICS, "train_loss": None, "eval_loss": None}
    assert checkpoint == {"step": 10, "metrics": {**CHECKPOINT_METRICS, "valid_loss": None}}


def request(method: str, path: str, **kwargs: Any) -> httpx.Request:
    return httpx.Request(method, f"http://api.invalid{INTERNAL}/jobs/ftjob-1{path}", **kwargs)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (request("POST", "/complete", json={"status": "succeeded", "tokens": 3}), "extra_forbidden"),
        (request("POST", "/complete", json={"trained_tokens": 3}), "missing"),
        (request("POST", "/events", json={"events": [{"seq": 1, "level": "info"}]}), "missing"),
        (request("POST", "/events", json={"events": [{"message": "m", "kind": "x"}]}), "extra_forbidden"),
        (request("POST", "/checkpoints", json={"step": 0, "metrics": {}}), "greater_than"),
        (request("POST", "/heartbeats"), "no route"),
        (request("GET", "/heartbeat"), "with ['POST'] only"),
        (request("POST", "/heartbeat", json={"alive": True}), "declares none"),
        (request("PUT", "/adapter", params={"format": "gguf"}, content=b"x"), "literal_error"),
        (request("PUT", "/adapter", params={"fmt": "peft"}, content=b"x"), "unknown query parameter"),
        (request("PUT", "/resume_states", params={"step": 1}, content=b"x"), "sha256"),
        (request("PUT", "/checkpoints/latest/adapter", content=b"x"), "int_parsing"),
    ],
)
def test_the_check_refuses_what_the_api_would(
    bad: httpx.Request, why: str, api_routes: list[APIRoute]
) -> None:
    with pytest.raises(AssertionError, match=why.replace("[", r"\[").replace("]", r"\]")):
        check_against_api(bad, api_routes)
