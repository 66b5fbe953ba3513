"""Fuzzing: schemathesis against the live `/openapi.json` of the API served over real HTTP (uvicorn), as
`phitune api` serves it, with a real tenant's key and the admin key.

Every operation of the document is tried with schemathesis' coverage cases (boundaries, missing and wrong
parameters, undeclared methods) and generated ones, valid and invalid. Before each operation the tenant is
seeded over HTTP with a valid dataset, a queued job and a succeeded one (adapter, checkpoint, events, its
fine-tuned model), and most generated cases get those real ids in their path and in the body fields that name
objects (`training_file`, chat `model`), so job, adapter, model and chat paths are reached, not only their
404s. Chat completions reach a stand-in inference server over real HTTP that checks the API's credential and
validates each /generate body against `app.inference_contract` (a body the contract refuses is its 500, so
the API's 503). Every response must be no 5xx, declared (status, content type, body against its schema,
headers), a refusal of what the schema refuses, and a 401 without credentials.

Derandomized (Hypothesis' fixed seed, no example database), so CI draws what a local run draws;
`PHITUNE_FUZZ_EXAMPLES` (generated cases per operation and generation mode, default 20) raises the count for
a longer local run. The case and status counts per
operation are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.openapi.checks import RejectedPositiveData

import migrations
from app.config import Settings
from app.inference_contract import GenerateBody
from app.main import create_app
from tests.api.test_checkpoints import store_checkpoint
from tests.api.test_internal import claim, tiny_archive
from tests.conftest import POSTGRES_URL, fresh_postgres_database, make_key
from tests.serving.stub_store import serve_in_thread
from tests.utils import CHAT_LINES, jsonl, upload_file

DEFAULT_EXAMPLES = 20
EXAMPLES = int(os.environ.get("PHITUNE_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
MIN_CASES = 1000  # at the default EXAMPLES (issue 11, item 8)
ADMIN_KEY = "fuzz-admin-key-" + "a" * 32
INFERENCE_TOKEN = "fuzz-inference-token"
WORKER_TOKEN = "test-worker-token"  # tests.api.test_internal's WORKER header
PLACEHOLDER = "seeded:"
# Error codes of schema-valid requests refused for what no schema states: an `after` cursor or a model
# that names no object, fields that contradict each other, a dataset whose lines are not a chat dataset, an
# Idempotency-Key an earlier, different request used.
SEMANTIC_REFUSALS = {
    "invalid_cursor",
    "model_not_available",
    "invalid_file",
    "conflicting_parameters",
    "idempotency_key_reused",
    "tracker_not_configured",  # training_config.report_to names a tracker the server does not offer
    "invalid_url",  # a webhook URL that is no http(s) URL, or names no host
    "too_many_webhooks",
    "incompatible_init_from",  # training_config.init_from's adapter has another base model or LoRA settings
    "invalid_file_format",  # a chat file for a DPO job, or a preference file for a supervised one
}
# Fields with rules of their own that no schema keyword states: (operation, field) → the rule.
FIELD_RULES = {
    ("POST /v1/admin/keys", "expires_at"): "in the future",
    ("POST /v1/admin/keys", "expires_in"): "not with expires_at",
    ("POST /v1/admin/keys", "tenant"): "printable characters, no leading or trailing space",
    ("POST /v1/fine_tuning/jobs", "method.dpo"): "only with method.type dpo",
    ("POST /v1/fine_tuning/jobs", "method.supervised"): "only with method.type supervised",
}


def inference_stub(token: str) -> FastAPI:
    """POST /generate answering as the inference server does, for callers with `token` only; a body that
    `GenerateBody` refuses raises, an unhandled 500 as the real server's would be."""
    app = FastAPI()

    @app.post("/generate")
    async def generate(request: Request):
        if request.headers.get("authorization") != f"Bearer {token}":
            return JSONResponse({"error": {"message": "no", "type": "authentication_error"}}, 401)
        body = GenerateBody.model_validate_json(await request.body())
        done = {"finish_reason": "stop", "prompt_tokens": 7, "completion_tokens": 2}
        if not body.stream:
            return {"text": "4.", **done}
        events = [{"delta": "4"}, {"delta": "."}, done]
        return StreamingResponse(
            iter([f"data: {json.dumps(event)}\n\n" for event in events]), media_type="text/event-stream"
        )

    @app.delete("/adapters/{adapter_id}")
    async def evict(adapter_id: str) -> dict[str, str]:
        return {"id": adapter_id}

    return app


def operations(live: Live) -> list[tuple[str, str]]:
    """(method, path) of every operation /openapi.json lists."""
    document = httpx.get(f"{live.base_url}/openapi.json").json()
    return [(method, path) for path, methods in document["paths"].items() for method in methods]


@dataclass
class Live:
    """The API under test, its tenant's and admin's credentials, the seeded ids and what was sent."""

    base_url: str
    database_url: str
    auth: dict[str, str]
    admin: dict[str, str]
    operations: set[str] = field(default_factory=set)  # "GET /v1/files", … as /openapi.json lists them
    ids: dict[str, list[str]] = field(default_factory=dict)
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)

    def seed(self) -> None:
        """Fresh objects of every kind, so that an operation run after a delete or cancel still finds some."""
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            file_id = upload_file(client, self.auth, CHAT_LINES)  # type: ignore[arg-type]
            queued = self._job(client, file_id, {})
            done = self._job(client, file_id, {"suffix": "fz", "training_config": {"save_steps": 2}})
            _, attempt = claim(client, done)
            checkpoint = store_checkpoint(client, done, attempt, 2, tiny_archive())
            events = {
                "events": [{"level": "info", "message": "step 2", "type": "metrics", "data": {"step": 2}}]
            }
            client.post(f"/internal/v1/jobs/{done}/events", json=events, headers=attempt)
            client.put(f"/internal/v1/jobs/{done}/adapter", content=tiny_archive(), headers=attempt)
            complete = client.post(
                f"/internal/v1/jobs/{done}/complete", json={"status": "succeeded"}, headers=attempt
            )
            assert complete.status_code == 200, complete.text
            model = client.get(f"/v1/fine_tuning/jobs/{done}", headers=self.auth).json()["fine_tuned_model"]
            export = client.post(f"/v1/fine_tuning/jobs/{done}/exports", json={}, headers=self.auth)
            assert export.status_code in (200, 202), export.text
            key = client.post("/v1/admin/keys", json={"tenant": "fuzz-other"}, headers=self.admin).json()
            webhook = self._webhook(client)
        self.ids = {
            "file_id": [file_id],
            "fine_tuning_job_id": [queued, done],
            "final_job": [done],
            "model_id": [model, checkpoint["fine_tuned_model_checkpoint"], "tiny-phi3"],
            "key_id": [key["id"]],  # never the fuzzing tenant's own key: revoking it would end the run
            "checkpoint": [checkpoint["id"]],
            "export_id": [export.json()["id"]],
            "webhook_id": [webhook],
        }

    def _job(self, client: httpx.Client, file_id: str, extra: dict[str, Any]) -> str:
        body = {"model": "tiny-phi3", "training_file": file_id, **extra}
        response = client.post("/v1/fine_tuning/jobs", json=body, headers=self.auth)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def _webhook(self, client: httpx.Client) -> str:
        """A webhook of the tenant: one left by an earlier operation, else a new one (the tenant may hold
        no more than MAX_WEBHOOKS_PER_TENANT)."""
        listed = client.get("/v1/webhooks", headers=self.auth).json()["data"]
        if listed:
            return listed[0]["id"]
        body = {"url": "http://127.0.0.1:9/fuzz", "events": ["fine_tuning.job.cancelled"]}
        response = client.post("/v1/webhooks", json=body, headers=self.auth)
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def report(self) -> str:
        lines = [f"fuzzed {self.cases.total()} cases over {len(self.cases)} operations:"]
        for label, count in sorted(self.cases.items()):
            statuses = sorted((status, n) for (other, status), n in self.statuses.items() if other == label)
            lines.append(f"  {count:5} {label}: " + ", ".join(f"{status}×{n}" for status, n in statuses))
        return "\n".join(lines)

    @property
    def key(self) -> str:
        return self.auth["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def fresh_database(tmp_path: Path) -> Iterator[str]:
    """A database of its own (PostgreSQL, production's, when the tests have one; else SQLite): the fuzzer
    makes tenants and keys through the admin API, which the shared session databases should not hold."""
    if POSTGRES_URL:
        with fresh_postgres_database() as url:
            migrations.upgrade(url)
            yield url
    else:
        url = f"sqlite:///{tmp_path / 'fuzz.db'}"
        migrations.upgrade(url)
        yield url


@pytest.fixture
def live(tmp_path: Path, fresh_database: str) -> Iterator[Live]:
    """The API over real HTTP, chat completions answered by `inference_stub`."""
    database_url = fresh_database
    with serve_in_thread(inference_stub(INFERENCE_TOKEN)) as inference_url:
        app = create_app(
            Settings(
                data_dir=tmp_path / "data",
                database_url=database_url,
                broker_url="memory://",
                worker_token=WORKER_TOKEN,
                serving_token="test-serving-token",
                inference_token=INFERENCE_TOKEN,
                inference_url=inference_url,
                admin_key=ADMIN_KEY,
                max_upload_bytes=1024 * 1024,
                # Off: thousands of requests in a minute from one key, and as many jobs, are the point here.
                rate_limit_per_minute=0,
                max_active_jobs_per_tenant=0,
                # Made-up webhook URLs are registered unresolved, and the sender never gets round to them:
                # the fuzzer checks the API's answers, and sends nothing anywhere.
                webhook_allow_private_urls=True,
                webhook_poll_seconds=3600,
            )
        )
        with serve_in_thread(app) as base_url:
            live = Live(
                base_url,
                database_url,
                auth={"Authorization": f"Bearer {make_key(database_url)}"},
                admin={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            live.operations = {f"{method.upper()} {path}" for method, path in operations(live)}
            yield live
    if live.cases:  # the fuzz test ran: how much it tried, and what came back
        print(live.report())
        assert set(live.cases) == live.operations, sorted(live.operations - set(live.cases))
        if EXAMPLES >= DEFAULT_EXAMPLES:
            assert live.cases.total() >= MIN_CASES, live.cases


@pytest.fixture
def api_schema(live: Live):
    # Credentials by the document's security schemes, so that schemathesis knows them: it sends every case
    # with its operation's key, and checks that the operation refuses the case without it (`ignored_auth`).
    schemes = {"APIKey": {"bearer": live.key}, "AdminKey": {"bearer": ADMIN_KEY}}
    config = schemathesis.Config.from_dict({"auth": {"openapi": schemes}})
    schema = schemathesis.openapi.from_url(f"{live.base_url}/openapi.json", config=config)

    @schema.hook
    def flatmap_case(context, case):
        """Most generated cases name seeded objects: a placeholder the test swaps for a real id (which
        changes between operations), so that drawing a case stays free of side effects."""
        return st.sampled_from([None, 0, 1, 2]).map(lambda pick: with_placeholders(case, pick))

    @schema.hook
    def filter_failure(context, failure, case, response) -> bool:
        """Keep every failure but a schema-valid request refused for what a schema cannot state."""
        return not (isinstance(failure, RejectedPositiveData) and semantic_refusal(case, response))

    return schema


def with_placeholders(case, pick: int | None):
    """`case` with placeholders for the `pick`-th seeded id in its path, its object-naming body fields and
    query parameters; `None`, or a case made to break the schema: as generated (a real id in place of the
    value that breaks it would make it a valid request, rightly accepted)."""
    if pick is None or (case.meta is not None and not case.meta.generation.mode.is_positive):
        return case
    for name in case.path_parameters or {}:
        case.path_parameters[name] = f"{PLACEHOLDER}{name}:{pick}"
    if isinstance(case.body, dict):
        for name in set(case.body) & {"training_file", "validation_file"}:
            case.body[name] = f"{PLACEHOLDER}file_id:{pick}"
        if case.path == "/v1/chat/completions" and "model" in case.body:
            case.body["model"] = f"{PLACEHOLDER}model_id:{pick}"
        if case.path == "/v1/fine_tuning/jobs" and "model" in case.body:
            case.body["model"] = "tiny-phi3"
        if case.path == "/v1/files" and "file" in case.body:
            case.body["file"] = jsonl(CHAT_LINES[: pick + 2])  # a valid dataset
        if case.path == "/v1/webhooks" and "url" in case.body:
            case.body["url"] = f"http://127.0.0.1:9/fuzz/{pick}"  # what the schema cannot say: a URL
    if case.query and "checkpoint" in case.query:
        case.query["checkpoint"] = f"{PLACEHOLDER}checkpoint:{pick}"
    return case


def resolve(case, ids: dict[str, list[str]]) -> None:
    """Swap the placeholders of `with_placeholders` for seeded ids."""

    def real(value: Any) -> Any:
        if not (isinstance(value, str) and value.startswith(PLACEHOLDER)):
            return value
        kind, pick = value.removeprefix(PLACEHOLDER).rsplit(":", 1)
        choices = ids.get(kind) or [value]
        return choices[int(pick) % len(choices)]

    for container in (case.path_parameters, case.body if isinstance(case.body, dict) else None, case.query):
        for name, value in (container or {}).items():
            container[name] = real(value)
    if case.path.endswith("/events") and streams(case):
        # A live stream ends only once its job is final: follow the succeeded one, never a queued one.
        case.path_parameters["fine_tuning_job_id"] = ids["final_job"][0]
    if "export_id" in (case.path_parameters or {}):  # the seeded export is the succeeded job's
        case.path_parameters["fine_tuning_job_id"] = ids["final_job"][0]


def streams(case) -> bool:
    query, headers = case.query or {}, {k.lower(): v for k, v in (case.headers or {}).items()}
    return str(query.get("stream")).lower() in ("true", "1", "yes", "on") or "text/event-stream" in str(
        headers.get("accept", "")
    )


def semantic_refusal(case, response) -> bool:
    """Whether a schema-valid request was refused (400/422, OpenAI's shape) for what no JSON Schema keyword
    states: a `SEMANTIC_REFUSALS` code, a rule of a model validator (pydantic's "Value error, …": fields that
    contradict each other), a rule of a field (`FIELD_RULES`), or a bound that an integer past
    2**53 breaks while the fuzzer, comparing as a double, thought it met (a chat `seed` of 2**63 + 192)."""
    if response.status_code not in (400, 422):
        return False
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    param = error.get("param") or ""
    value = case.body.get(param) if isinstance(case.body, dict) else None
    return (
        error.get("code") in SEMANTIC_REFUSALS
        or "Value error, " in error.get("message", "")
        or (case.operation.label, param) in FIELD_RULES
        or (isinstance(value, int) and abs(value) > 2**53)
    )


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy schemas rename the test after each operation through `node._nodeid`, which
    pytest 9.2 no longer has (its node id is derived from `_id`): give it one to read and write."""
    request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_every_operation(case, live: Live) -> None:
    label = case.operation.label
    if not live.cases[label]:
        live.seed()  # fresh objects for each operation: the previous one may have deleted or cancelled them
    live.cases[label] += 1
    resolve(case, live.ids)
    response = case.call_and_validate(timeout=30)
    live.statuses[(label, response.status_code)] += 1


BAD_CREDENTIALS = {
    "no Authorization header": {},
    "an empty header": {"Authorization": ""},
    "another scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
    "a bearer with no key": {"Authorization": "Bearer"},
    "a made-up key": {"Authorization": "Bearer pt-" + "A" * 43},
    "the worker token": {"Authorization": f"Bearer {WORKER_TOKEN}"},
    "the inference token": {"Authorization": f"Bearer {INFERENCE_TOKEN}"},
}


def test_bad_or_missing_credentials_are_401_on_every_operation(live: Live) -> None:
    """Every operation of /openapi.json but the health checks declares its key, and answers 401 in OpenAI's
    shape to each of `BAD_CREDENTIALS`, to a tenant's key on the admin API and to the admin key on a tenant's
    route: with real ids in the path (a 404 would say the object exists or not), and a body that is an
    empty object or not JSON at all (a 400 would be an answer about the request before its caller is
    known: FastAPI parses a body before the route's dependencies check the key)."""
    live.seed()
    document = httpx.get(f"{live.base_url}/openapi.json").json()
    secured = [(method, path) for method, path in operations(live) if path not in ("/healthz", "/readyz")]
    assert len(secured) == len(live.operations) - 2
    tried = 0
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        for method, path in secured:
            operation = document["paths"][path][method]
            admin = path.startswith("/v1/admin/")
            assert operation["security"] == [{"AdminKey" if admin else "APIKey": []}], (method, path)
            assert "401" in operation["responses"], (method, path)
            url = path.format(**{name: live.ids[name][0] for name in live.ids if f"{{{name}}}" in path})
            wrong_key = live.auth if admin else live.admin
            for why, headers in {**BAD_CREDENTIALS, "the other API's key": wrong_key}.items():
                bodies: list[dict[str, Any]] = [{}]
                if method in ("post", "put", "patch"):
                    json_headers = {**headers, "Content-Type": "application/json"}
                    bodies = [{"json": {}}, {"content": b"{", "headers": json_headers}]
                for body in bodies:
                    response = client.request(method, url, **{"headers": headers, **body})
                    assert response.status_code == 401, (method, url, why, body, response.text)
                    error = response.json()["error"]
                    assert error["type"] == "authentication_error" and error["code"], (method, url, why)
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                tried += 1
    assert tried == len(secured) * (len(BAD_CREDENTIALS) + 1)
    for method, path in (("get", "/healthz"), ("get", "/readyz")):
        assert "security" not in document["paths"][path][method]
