"""Real processes for end-to-end tests: the API under uvicorn and a Celery worker, or `phitune serve`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.service_auth import bearer
from phitune.launch import REPO, free_port, healthy, phitune_command
from phitune.launch import run_phitune as phitune
from tests.conftest import POSTGRES_URL, REDIS_URL, fresh_postgres_database


@dataclass
class Service:
    """Running phitune processes and an authenticated HTTP client against their API."""

    base_url: str
    env: dict[str, str]
    data_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    api_key: str = ""
    inference_url: str = ""

    @property
    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=60
        )

    @property
    def inference_headers(self) -> dict[str, str]:
        """The credential the API calls the inference server with (generated into the data dir if unset)."""
        settings = Settings(data_dir=self.data_dir, inference_token=self.env.get("PHITUNE_INFERENCE_TOKEN"))
        return bearer(settings.resolved_inference_token)

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen:
        log = self.data_dir / f"{name}.log"
        self.logs.append(log)
        with log.open("w") as out:
            process = subprocess.Popen(
                phitune_command(*args),
                env={**self.env, **env},
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def wait_ready(self, *urls: str, timeout: float = 60) -> None:
        """Wait until the API (and any other server at `urls`) answers /healthz."""
        deadline = time.monotonic() + timeout
        for url in (self.base_url, *urls):
            while not healthy(url):
                for process in self.processes:
                    assert process.poll() is None, f"a process exited early:\n{self.tail_logs()}"
                assert time.monotonic() < deadline, f"{url} not ready after {timeout}s:\n{self.tail_logs()}"
                time.sleep(0.2)

    def tail_logs(self, lines: int = 60) -> str:
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-lines:])
            for log in self.logs
            if log.exists()
        )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def service_env(data_dir: Path, port: int, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")}
    env.update(
        PHITUNE_DATA_DIR=str(data_dir),
        PHITUNE_API_URL=f"http://127.0.0.1:{port}",
        PHITUNE_BASE_URL=f"http://127.0.0.1:{port}",  # where the `phitune` CLI's HTTP commands go
        PHITUNE_HEARTBEAT_SECONDS="1",
        PHITUNE_HOUSEKEEPING_SECONDS="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({f"PHITUNE_{name.upper()}": value for name, value in settings.items()})
    return env


def serving(data_dir: Path, **settings: str) -> Iterator[Service]:
    """`phitune serve` on a fresh data dir (SQLite, filesystem broker, tiny model generated on first use),
    with these PHITUNE_ settings; for fixtures to yield from."""
    port, inference_port = free_port(), free_port()
    service = Service(f"http://127.0.0.1:{port}", service_env(data_dir, port, **settings), data_dir)
    service.inference_url = f"http://127.0.0.1:{inference_port}"
    service.start("serve", "serve", "--port", str(port), "--inference-port", str(inference_port))
    service.wait_ready(service.inference_url, timeout=120)
    service.api_key = phitune("keys", "create", "--tenant", "e2e", env=service.env).strip().splitlines()[-1]
    yield service
    service.stop()


def api_alone(data_dir: Path, api_env: dict[str, str] | None = None, **settings: str) -> Iterator[Service]:
    """`phitune api` alone on a migrated, fresh embedded data dir with these PHITUNE_ settings (and `api_env`
    in the API process's environment only, e.g. storage credentials); the test starts any worker itself.
    For fixtures to yield from."""
    port = free_port()
    env = service_env(data_dir, port, **settings)
    service = Service(f"http://127.0.0.1:{port}", env, data_dir)
    phitune("migrate", env=env)
    service.api_key = phitune("keys", "create", "--tenant", "e2e", env=env).strip().splitlines()[-1]
    service.start("api", "api", "--port", str(port), **(api_env or {}))
    service.wait_ready()
    yield service
    service.stop()


@pytest.fixture
def embedded_service(tmp_path: Path) -> Iterator[Service]:
    """`phitune serve` on a fresh data dir with the embedded defaults."""
    yield from serving(tmp_path)


@pytest.fixture
def production_service(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Service]:
    """Separate `phitune api` and `phitune worker` processes on PostgreSQL and Redis."""
    if not (POSTGRES_URL and REDIS_URL):
        pytest.skip("PHITUNE_TEST_DATABASE_URL and PHITUNE_TEST_REDIS_URL are not set")
    with fresh_postgres_database() as database_url:
        yield from _production_service(tmp_path, tiny_model_dir, database_url)


def _production_service(tmp_path: Path, tiny_model_dir: Path, database_url: str) -> Iterator[Service]:
    port, inference_port, key_prefix = free_port(), free_port(), f"phitune-test-{secrets.token_hex(4)}:"
    # "missing-weights" has a config.json (the API checks jobs against it) but no weights: training fails.
    (tmp_path / "none").mkdir()
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "none" / "config.json")
    env = service_env(
        tmp_path,
        port,
        database_url=database_url,
        broker_url=REDIS_URL,
        broker_key_prefix=key_prefix,
        base_models=json.dumps({"tiny-phi3": str(tiny_model_dir), "missing-weights": str(tmp_path / "none")}),
        worker_token=secrets.token_urlsafe(16),
        inference_url=f"http://127.0.0.1:{inference_port}",
    )
    service = Service(f"http://127.0.0.1:{port}", env, tmp_path)
    phitune("migrate", env=env)
    service.api_key = phitune("keys", "create", "--tenant", "e2e", env=env).strip().splitlines()[-1]
    service.start("api", "api", "--port", str(port))
    service.start("worker", "worker")
    # The inference server loads every base model at start-up; "missing-weights" exists to fail training.
    only_tiny = json.dumps({"tiny-phi3": str(tiny_model_dir)})
    service.start("inference", "inference", "--port", str(inference_port), PHITUNE_BASE_MODELS=only_tiny)
    service.wait_ready(f"http://127.0.0.1:{inference_port}")
    yield service
    service.stop()
    _delete_redis_keys(key_prefix)


def _delete_redis_keys(prefix: str) -> None:
    """Leave the shared Redis as it was: the broker's keys all carry this run's prefix."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def ask(client: httpx.Client, model: str, max_tokens: int, **settings: object) -> httpx.Response:
    """POST /v1/chat/completions: the model's answer to "Who are you?", whole (what the CLI's and the
    dashboard's streamed answers are checked against)."""
    messages = [{"role": "user", "content": "Who are you?"}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, **settings}
    return client.post("/v1/chat/completions", json=body)


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    """Every event of a job, oldest first, page after page."""
    events: list[dict] = []
    params: dict[str, str | int] = {"limit": 100, "order": "asc"}
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        params["after"] = page["last_id"]
