"""200 clients following one job's live events, against a real `phitune api` process: the API stays fast,
the worker's event posts get through, and every follower gets every event and the end of the stream."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.followers import FollowerProcess, event_ids, finish, percentile_ms, start_job, under_worker_load
from tests.e2e.conftest import Service, api_alone

pytestmark = pytest.mark.e2e
FOLLOWERS = 200
ROUNDS = 200
WORKER_TOKEN = "e2e-worker-token"


@pytest.fixture
def api_service(tmp_path: Path) -> Iterator[Service]:
    """`phitune api` alone on the embedded defaults (SQLite, filesystem broker); the test is the worker."""
    # 200 streams and their probes on one key, past the limits' defaults (tests/api/test_limits.py).
    yield from api_alone(
        tmp_path, worker_token=WORKER_TOKEN, rate_limit_per_minute="0", max_event_streams_per_tenant="0"
    )


def test_200_followers_of_one_job_leave_the_api_and_the_worker_fast(api_service: Service):
    with api_service.client as client:
        job_id, attempt = start_job(client, WORKER_TOKEN)
        backlog = len(event_ids(client, job_id))
        # The followers run in a child process, so that their reading does not delay the probes here.
        with FollowerProcess(
            api_service.base_url, api_service.api_key, job_id, FOLLOWERS, backlog
        ) as followers:
            assert followers.connected() == FOLLOWERS, "not every follower received the job's events"
            paths = [f"/v1/fine_tuning/jobs/{job_id}", "/healthz", "/v1/files"]
            probes, posts = under_worker_load(client, job_id, attempt, paths, ROUNDS)
            delivered = followers.delivered(backlog + len(posts))
            finish(client, job_id, attempt)
            ended = followers.finished()
        every = event_ids(client, job_id)

    for path, latencies in probes.items():
        p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
        print(f"GET {path} with {FOLLOWERS} followers: p50 {p50} ms, p99 {p99} ms")
        assert p99 < 100, f"GET {path}: p99 {p99} ms with {FOLLOWERS} followers"
    post_p99 = percentile_ms(posts, 99)
    print(f"{len(posts)} worker event posts: p50 {percentile_ms(posts, 50)} ms, p99 {post_p99} ms")
    assert post_p99 < 100, f"worker event posts: p99 {post_p99} ms with {FOLLOWERS} followers"
    assert delivered, "not every follower received every posted event while the job ran"
    assert len(every) == backlog + len(posts) + 2  # the cancellation request and the job's end
    assert len(ended) == FOLLOWERS
    for follower in ended:
        assert follower.ids == every and follower.done
