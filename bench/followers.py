"""Event-stream followers benchmark: API latency while many clients follow one job's live events.

A real `phitune api` process (embedded defaults: SQLite, filesystem broker) serves a job driven by a fake
worker over HTTP, which posts EVENTS_PER_SECOND metrics events throughout. In the same run, `GET
/v1/fine_tuning/jobs/{id}` is timed PROBES times in sequence (more while the worker has posted fewer than
MIN_POSTS), first with no followers (the baseline), then with FOLLOWERS clients following its event stream:

    p50_ms, p99_ms                    with no followers
    p50_ms_followed, p99_ms_followed  with FOLLOWERS followers
    p99_ratio                         p99_ms_followed ÷ p99_ms
    post_p99_ms, post_p99_ms_followed the worker's event posts, without and with followers

The followers run in a child process, one event loop for all of them: in the measuring process their
reads would delay the probes' responses and count as server latency. At the end every follower must have
received every event once, in order, and `event: done`. `tests/e2e/test_event_followers.py` uses the same
building blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

from phitune.launch import free_port, run_phitune, running

FOLLOWERS = 200
EVENTS_PER_SECOND = 20
PROBES = 300
MIN_POSTS = 200
WAVE = 10
WORKER_TOKEN = "bench-worker-token"
DATASET = json.dumps(
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr."}]}
)


@dataclass
class Follower:
    """One client following a job's live event stream: the event ids it got, in order, and whether the
    stream ended with `event: done`."""

    ids: list[str] = field(default_factory=list)
    done: bool = False

    async def run(self, client: httpx.AsyncClient, job_id: str) -> None:
        url = f"/v1/fine_tuning/jobs/{job_id}/events"
        async with client.stream("GET", url, params={"stream": "true"}) as response:
            response.raise_for_status()
            buffer = b""
            async for chunk in response.aiter_bytes():
                *frames, buffer = (buffer + chunk).split(b"\n\n")
                for frame in frames:
                    if frame.startswith(b"id: "):
                        self.ids.append(frame[4 : frame.index(b"\n")].decode())
                    elif frame.startswith(b"event: done"):
                        self.done = True


class FollowerProcess:
    """`count` followers of a job in a child process. Steps, each with a timeout: `connected()` once each
    has the job's `backlog` events, `delivered(total)` once each has `total`, `finished()` once every
    stream has ended (after the job did)."""

    def __init__(self, base_url: str, key: str, job_id: str, count: int, backlog: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child_end = context.Pipe()
        self._process = context.Process(
            target=_follow, args=(base_url, key, job_id, count, backlog, child_end), daemon=True
        )

    def __enter__(self) -> FollowerProcess:
        self._process.start()
        return self

    def __exit__(self, *_) -> None:
        self._process.kill()
        self._process.join()

    def connected(self, timeout: float = 300) -> int:
        """How many followers received the backlog (all, or the waves before one that did not in time)."""
        return self._receive(timeout)

    def delivered(self, total: int, timeout: float = 30) -> bool:
        self._pipe.send(total)
        return self._receive(timeout + 5)

    def finished(self, timeout: float = 30) -> list[Follower]:
        return self._receive(timeout + 5)

    def _receive(self, timeout: float):
        if not self._pipe.poll(timeout):
            raise TimeoutError(f"the follower process did not answer within {timeout} s")
        return self._pipe.recv()


def _follow(base_url: str, key: str, job_id: str, count: int, backlog: int, pipe) -> None:
    asyncio.run(_follow_steps(base_url, key, job_id, count, backlog, pipe))


async def _follow_steps(base_url: str, key: str, job_id: str, count: int, backlog: int, pipe) -> None:
    client = httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(60, read=None),
        limits=httpx.Limits(max_connections=count, max_keepalive_connections=count),
    )
    async with client:
        followers: list[Follower] = []
        tasks: list[asyncio.Task] = []
        # WAVE at a time: hundreds of simultaneous requests of any kind exhaust the API's database pool
        # (15 connections for 40 threads), which is not what this measures.
        while len(followers) < count:
            wave = [Follower() for _ in range(min(WAVE, count - len(followers)))]
            tasks += [asyncio.create_task(follower.run(client, job_id)) for follower in wave]
            followers += wave
            if not await until(lambda wave=wave: all(len(f.ids) >= backlog for f in wave), 60):
                break
        pipe.send(sum(len(f.ids) >= backlog for f in followers))
        total = await asyncio.to_thread(pipe.recv)
        pipe.send(await until(lambda: all(len(f.ids) >= total for f in followers), 30))
        await asyncio.wait(tasks, timeout=30)
        pipe.send(followers)


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    """Wait up to `timeout` seconds for `condition()`; whether it came true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def start_job(client: httpx.Client, worker_token: str) -> tuple[str, dict[str, str]]:
    """A running job claimed by a fake worker: its id and the attempt's Authorization header."""
    file_id = client.post(
        "/v1/files", files={"file": ("followers.jsonl", DATASET.encode())}, data={"purpose": "fine-tune"}
    ).json()["id"]
    job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-phi3", "training_file": file_id})
    job.raise_for_status()
    job_id = job.json()["id"]
    claim = client.post(
        f"/internal/v1/jobs/{job_id}/claim", headers={"Authorization": f"Bearer {worker_token}"}
    )
    claim.raise_for_status()
    return job_id, {"Authorization": f"Bearer {claim.json()['token']}"}


def event_ids(client: httpx.Client, job_id: str) -> list[str]:
    """Every event id of the job, oldest first, from the paged list."""
    ids: list[str] = []
    params: dict[str, str | int] = {"limit": 100, "order": "asc"}
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        ids += [event["id"] for event in page["data"]]
        if not page["has_more"]:
            return ids
        params["after"] = ids[-1]


def under_worker_load(
    client: httpx.Client,
    job_id: str,
    attempt: dict[str, str],
    paths: list[str],
    rounds: int,
    min_posts: int = MIN_POSTS,
) -> tuple[dict[str, list[float]], list[float]]:
    """GET each of `paths` in turn, `rounds` times in sequence (and on until `min_posts` posts, so that
    their p99 is not merely their maximum), while a fake worker posts one metrics event every
    1/EVENTS_PER_SECOND s: the latencies (s) of each path, and of each post (every one must succeed)."""
    return asyncio.run(_under_worker_load(client, job_id, attempt, paths, rounds, min_posts))


async def _under_worker_load(
    sync_client: httpx.Client,
    job_id: str,
    attempt: dict[str, str],
    paths: list[str],
    rounds: int,
    min_posts: int,
) -> tuple[dict[str, list[float]], list[float]]:
    probes: dict[str, list[float]] = {path: [] for path in paths}
    posts: list[float] = []
    probing = True

    async def timed(request) -> float:
        start = time.perf_counter()
        (await request).raise_for_status()
        return time.perf_counter() - start

    async def post() -> None:
        next_at = time.monotonic()
        while probing:
            step = len(posts)
            body = {"events": [{"type": "metrics", "message": f"Step {step}", "data": {"step": step}}]}
            url = f"/internal/v1/jobs/{job_id}/events"
            posts.append(await timed(client.post(url, json=body, headers=attempt)))
            next_at += 1 / EVENTS_PER_SECOND
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async with httpx.AsyncClient(
        base_url=sync_client.base_url, headers=sync_client.headers, timeout=60
    ) as client:
        poster = asyncio.create_task(post())
        try:
            while len(probes[paths[0]]) < rounds or len(posts) < min_posts:
                for path in paths:
                    probes[path].append(await timed(client.get(path)))
        finally:
            probing = False
            await poster
    return probes, posts


def finish(client: httpx.Client, job_id: str, attempt: dict[str, str]) -> None:
    """Cancel the job, and report the cancellation as its worker would."""
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").raise_for_status()
    url = f"/internal/v1/jobs/{job_id}/complete"
    client.post(url, json={"status": "cancelled"}, headers=attempt).raise_for_status()


def percentile_ms(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) in milliseconds."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000, 2)


def measure(base_url: str, key: str, worker_token: str) -> dict[str, object]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        job_id, attempt = start_job(client, worker_token)
        path = f"/v1/fine_tuning/jobs/{job_id}"
        alone, alone_posts = under_worker_load(client, job_id, attempt, [path], PROBES)
        backlog = len(event_ids(client, job_id))
        with FollowerProcess(base_url, key, job_id, FOLLOWERS, backlog) as followers:
            if (connected := followers.connected()) < FOLLOWERS:
                raise RuntimeError(f"only {connected} of {FOLLOWERS} followers received the job's events")
            followed, posts = under_worker_load(client, job_id, attempt, [path], PROBES)
            finish(client, job_id, attempt)
            every = event_ids(client, job_id)
            delivered = followers.delivered(len(every))
            ended = followers.finished()
    if not delivered or not all(follower.done and follower.ids == every for follower in ended):
        raise RuntimeError("a follower missed events or the end of its stream")
    p99, p99_followed = percentile_ms(alone[path], 99), percentile_ms(followed[path], 99)
    return {
        "p50_ms": percentile_ms(alone[path], 50),
        "p99_ms": p99,
        "p50_ms_followed": percentile_ms(followed[path], 50),
        "p99_ms_followed": p99_followed,
        "p99_ratio": round(p99_followed / p99, 2),
        "post_p99_ms": percentile_ms(alone_posts, 99),
        "post_p99_ms_followed": percentile_ms(posts, 99),
        "followers": FOLLOWERS,
        "events_per_second": EVENTS_PER_SECOND,
        "probes": PROBES,
        "path": "client -> API process (SQLite); followers in a child process",
    }


@contextlib.contextmanager
def api_process(env: dict[str, str], port: int) -> Iterator[str]:
    """`phitune api` on `port` until the block ends."""
    base_url = f"http://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with running(["api", "--port", str(port)], base_url, env=env, timeout=60, **quiet):
        yield base_url


def run() -> dict[str, object]:
    """The whole benchmark, from scratch in a temporary data directory."""
    with tempfile.TemporaryDirectory(prefix="phitune-bench-") as scratch:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")} | {
            "PHITUNE_DATA_DIR": scratch,
            "PHITUNE_API_URL": f"http://127.0.0.1:{port}",
            "PHITUNE_WORKER_TOKEN": WORKER_TOKEN,
            # FOLLOWERS streams and the probes on one key, past the limits' defaults.
            "PHITUNE_RATE_LIMIT_PER_MINUTE": "0",
            "PHITUNE_MAX_EVENT_STREAMS_PER_TENANT": "0",
        }
        run_phitune("migrate", env=env)
        key = run_phitune("keys", "create", "--tenant", "bench", env=env).strip().splitlines()[-1]
        with api_process(env, port) as base_url:
            return measure(base_url, key, WORKER_TOKEN)
