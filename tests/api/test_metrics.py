"""GET /metrics cannot be blown up: requests are labelled by route template, every path no route matches by
one label, and no label comes from what a request says (its path, an invented method, its tenant)."""

from __future__ import annotations

import random
import string

from fastapi.testclient import TestClient

from app.metrics import route_template

METHODS = ("GET", "POST", "DELETE", "PUT", "BREW", "X-RANDOM")


def word(rng: random.Random, letters: str = string.ascii_letters + string.digits + "-_.~") -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(1, 24)))


# Made-up paths under routes with parameters (/v1/models/{model_id:path} takes any depth) and elsewhere.
PATHS = (
    lambda rng: f"/v1/models/{word(rng)}",
    lambda rng: "/v1/models/" + "/".join(word(rng) for _ in range(rng.randint(2, 6))),
    lambda rng: f"/v1/files/{word(rng)}",
    lambda rng: f"/v1/files/{word(rng)}/content",
    lambda rng: f"/v1/fine_tuning/jobs/{word(rng)}/events",
    lambda rng: f"/v1/{word(rng)}/{word(rng)}",
    lambda rng: f"/{word(rng)}",
    lambda rng: f"/{word(rng)}/{word(rng)}/{word(rng)}?{word(rng)}={word(rng)}",
)


def series(client: TestClient) -> list[str]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return [line for line in response.text.splitlines() if line and not line.startswith("#")]


def test_random_unauthenticated_requests_leave_the_series_count_flat(client: TestClient) -> None:
    rng = random.Random(11)
    # Every kind of request once, so each label it may get exists before counting.
    for method in METHODS:
        for path in PATHS:
            client.request(method, path(rng))
    series(client)  # and a scrape, which is counted too
    before = series(client)

    sent = []
    for _ in range(3000):
        sent.append(rng.choice(PATHS)(rng))
        response = client.request(rng.choice(METHODS), sent[-1])
        assert 400 <= response.status_code < 500
        assert "error" in response.json()
    after = series(client)

    assert len(after) == len(before)
    labels = "\n".join(after)
    assert 'route="unmatched"' in labels and 'method="other"' in labels
    assert 'route="/v1/models/{model_id}"' in labels
    assert not [path for path in sent if f'route="{path.split("?")[0]}"' in labels]


def test_requests_are_labelled_by_their_route_template(client: TestClient, auth: dict[str, str]) -> None:
    for path in (
        "/v1/models/org/some-model/v2",
        "/v1/fine_tuning/jobs/jobs",  # an id equal to a word of the template
        "/v1/fine_tuning/jobs/ftjob-123/checkpoints",
        "/v1/files/file-abc/content",
    ):
        assert client.get(path, headers=auth).status_code == 404
    labels = "\n".join(series(client))
    for template in (
        "/v1/models/{model_id}",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
        "/v1/files/{file_id}/content",
    ):
        assert f'route="{template}",status="404"' in labels
    for raw in ("org/some-model", "ftjob-123", "file-abc", "/v1/fine_tuning/{"):
        assert raw not in labels


def test_a_scope_without_a_route_is_unmatched() -> None:
    assert route_template({"path": "/v1/anything", "path_params": {}}) == "unmatched"
