"""API benchmark: `GET /v1/fine_tuning/jobs/{id}` under 64 keep-alive clients ÷ a bare FastAPI endpoint.

`python -m bench api` migrates a fresh database, creates a key, uploads a file and creates a job through the
API (it stays queued: the filesystem broker, no worker), and serves two processes the same way
(`phitune.cli.processes.serve_asgi`, the uvicorn settings of `phitune api`):

    api          `phitune api`, its real `GET /v1/fine_tuning/jobs/{id}` (auth, database, response model),
                 every client polling the same job (a dashboard, a CLI watcher and SDK pollers of one job)
    api_64_jobs  the same, each request for the next of 64 jobs: no two concurrent polls share a row (on
                 PostgreSQL identical reads share a round trip, app.db._RawReads)
    bare         a FastAPI app whose `async def` route returns the same job object as a dict, no database

Each is driven by CONNECTIONS keep-alive clients for SECONDS seconds with `wrk` (Debian's `wrk`, two
threads) when it is on the PATH, else by an asyncio httpx load generator in a separate process (which
saturates itself first, at a few hundred requests/s on 2 cores: install `wrk` for real figures). Rounds
alternate api and bare, so a load from other processes on the machine hits both sides; the JSON line gives
requests/s, p50 and p99 (ms) and `cpu_us`, the server process's CPU time per request (µs, user and system,
from /proc: a figure that a load from other processes changes far less than requests/s) of each side as
the median over the rounds, `ratio` (api ÷ bare requests/s) as the median of the rounds' ratios, and its
range, and `ratio_64_jobs` the same for api_64_jobs. SQLite always; PostgreSQL too when
PHITUNE_TEST_DATABASE_URL names a server (a throwaway database is created on it and dropped).
BENCH_API_QUICK=1 runs one round of 2 s per side (a smoke test). Targets: p99 < 50 ms, ratio >= 0.5.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from phitune.launch import REPO, free_port, run_phitune, running, stop, wait_healthy

QUICK = os.environ.get("BENCH_API_QUICK") == "1"
CONNECTIONS = 64
SECONDS = 2 if QUICK else 10
ROUNDS = 1 if QUICK else 3
MODEL = "tiny-phi3"
JOBS = 64  # polled in turn by api_64_jobs
BARE_OBJECT_ENV = "BENCH_API_BARE_OBJECT"  # the JSON file the bare app serves


def bare_app():
    """The baseline: FastAPI answering a similar object from memory (uvicorn factory)."""
    from fastapi import FastAPI

    job = json.loads(Path(os.environ[BARE_OBJECT_ENV]).read_text())
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}")
    async def get_job(fine_tuning_job_id: str) -> dict[str, Any]:
        return job

    return app


@contextlib.contextmanager
def serving_bare(job: dict[str, Any], scratch: Path) -> Iterator[tuple[str, int]]:
    path = scratch / "bare-job.json"
    path.write_text(json.dumps(job))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = (
        "from phitune.cli.processes import serve_asgi; "
        f"serve_asgi('bench.api:bare_app', host='127.0.0.1', port={port})"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        env=os.environ | {BARE_OBJECT_ENV: str(path)},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(url, processes=[process])
        yield url, process.pid
    finally:
        stop(process)


def load(urls: list[str], headers: dict[str, str], server_pid: int) -> dict[str, float]:
    """requests/s, p50 and p99 (ms) of CONNECTIONS keep-alive clients on `urls` (each request the next of
    them) for SECONDS seconds, and the CPU time the server (process `server_pid`) spent per request (µs)."""
    cpu_before = cpu_seconds(server_pid)
    if shutil.which("wrk"):
        figures = _wrk(urls, headers)
    else:
        args = [sys.executable, "-m", "bench.api", "load", json.dumps(urls), json.dumps(headers)]
        done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True)
        figures = json.loads(done.stdout)
    cpu_us = (cpu_seconds(server_pid) - cpu_before) / figures.pop("requests") * 1e6
    return figures | {"cpu_us": cpu_us}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far (Linux's /proc/PID/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wrk(urls: list[str], headers: dict[str, str]) -> dict[str, float]:
    header_args = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    args = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", *header_args]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if len(urls) > 1:  # each thread's requests go through the paths in turn
            paths = ", ".join(json.dumps(httpx.URL(url).raw_path.decode()) for url in urls)
            script.write(
                f"local paths = {{{paths}}}\nlocal n = 0\n"
                "request = function()\n  n = n + 1\n  return wrk.format(nil, paths[n % #paths + 1])\nend\n"
            )
            script.flush()
            args += ["-s", script.name]
        out = subprocess.run([*args, urls[0]], capture_output=True, text=True, check=True).stdout
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"{match[1]} failed requests on {urls[0]}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    percentiles = {int(p): _ms(value) for p, value in re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.M)}
    if len(percentiles) != 2:
        raise RuntimeError(f"no latency distribution in wrk's output:\n{out}")
    return {"rps": rps, "p50_ms": percentiles[50], "p99_ms": percentiles[99], "requests": requests}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


async def _httpx_load(urls: list[str], headers: dict[str, str]) -> dict[str, float]:
    """The fallback load generator: CONNECTIONS clients, each one request at a time on its connection."""
    turns = itertools.cycle(urls)
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    latencies: list[float] = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=60) as client:
        await asyncio.gather(*(client.get(urls[0]) for _ in range(CONNECTIONS)))  # open the connections
        deadline = time.perf_counter() + SECONDS

        async def user() -> None:
            while (start := time.perf_counter()) < deadline:
                (await client.get(next(turns))).raise_for_status()
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "requests": len(latencies),
    }


def create_jobs(api_url: str, key: str, count: int) -> list[dict[str, Any]]:
    """A file upload and `count` jobs on it through the API; each job as `GET` answers it."""
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        uploaded = client.post(
            "/v1/files",
            files={"file": ("bench.jsonl", (json.dumps(row) + "\n").encode())},
            data={"purpose": "fine-tune"},
        )
        uploaded.raise_for_status()
        jobs = []
        for _ in range(count):
            job = client.post(
                "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": uploaded.json()["id"]}
            )
            job.raise_for_status()
            got = client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}")
            got.raise_for_status()
            jobs.append(got.json())
        return jobs


def measure(database_url: str | None, scratch: Path) -> dict[str, Any]:
    """Both servers on one database (SQLite in `scratch` when `database_url` is None), rounds alternating."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("PHITUNE_")} | {
        "PHITUNE_DATA_DIR": str(scratch / "data"),
        "PHITUNE_API_URL": api_url,
        "HF_HUB_OFFLINE": "1",
        # One key at full speed: a rate it never reaches, so that its check is measured but never refuses.
        "PHITUNE_RATE_LIMIT_PER_MINUTE": "1e12",
        "PHITUNE_RATE_LIMIT_BURST": "1000000000",
        "PHITUNE_MAX_ACTIVE_JOBS_PER_TENANT": str(JOBS),
    }
    if database_url:
        env["PHITUNE_DATABASE_URL"] = database_url
    run_phitune("migrate", env=env)
    key = run_phitune("keys", "create", "--tenant", "bench", env=env).strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with running(["api", "--port", str(port)], api_url, env=env, **quiet) as api_process:
        jobs = create_jobs(api_url, key, JOBS)
        with serving_bare(jobs[0], scratch) as (bare_url, bare_pid):
            paths = [f"/v1/fine_tuning/jobs/{job['id']}" for job in jobs]
            for url in (api_url, bare_url):  # warm up both (imports, connections, caches)
                httpx.get(url + paths[0], headers=headers, timeout=30).raise_for_status()
            rounds = []
            for _ in range(ROUNDS):
                api = load([api_url + paths[0]], headers, api_process.pid)
                api_64_jobs = load([api_url + path for path in paths], headers, api_process.pid)
                bare = load([bare_url + paths[0]], headers, bare_pid)
                rounds.append({"api": api, "api_64_jobs": api_64_jobs, "bare": bare})
    sides = {
        side: {
            figure: round(statistics.median(r[side][figure] for r in rounds), 1)
            for figure in ("rps", "p50_ms", "p99_ms", "cpu_us")
        }
        for side in ("api", "api_64_jobs", "bare")
    }
    ratios = {side: [r[side]["rps"] / r["bare"]["rps"] for r in rounds] for side in ("api", "api_64_jobs")}
    return sides | {
        "ratio": round(statistics.median(ratios["api"]), 3),
        "ratio_range": [round(min(ratios["api"]), 3), round(max(ratios["api"]), 3)],
        "ratio_64_jobs": round(statistics.median(ratios["api_64_jobs"]), 3),
    }


@contextlib.contextmanager
def throwaway_postgres(server_url: str) -> Iterator[str]:
    """An empty database on the server at `server_url`, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(server_url).set(drivername="postgresql+psycopg")
    name = f"phitune_bench_{secrets.token_hex(4)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def run() -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="phitune-bench-api-") as scratch:
        result["sqlite"] = measure(None, Path(scratch) / "sqlite")
        if server := os.environ.get("PHITUNE_TEST_DATABASE_URL"):
            with throwaway_postgres(server) as url:
                result["postgresql"] = measure(url, Path(scratch) / "postgresql")
    return result | {
        "connections": CONNECTIONS,
        "seconds": SECONDS,
        "rounds": ROUNDS,
        "load_generator": "wrk -t2" if shutil.which("wrk") else "httpx asyncio (separate process)",
        "targets": {"p99_ms": 50, "ratio": 0.5},
    }


if __name__ == "__main__" and sys.argv[1:2] == ["load"]:
    print(json.dumps(asyncio.run(_httpx_load(json.loads(sys.argv[2]), json.loads(sys.argv[3])))))
