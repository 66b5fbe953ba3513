"""`phitune serve` supervises: a dead child is restarted, the others keep running, SIGTERM stops them all."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from phitune.supervisor import Child, Supervisor
from tests.e2e.conftest import Service, serving
from tests.e2e.test_fine_tune import all_events, create_job, wait_final


def children(pid: int) -> dict[str, int]:
    """The live children of `pid` by phitune command (`api`, `worker`, `inference`) → their pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):  # exited while we looked
            continue
        if int(ppid) == pid and state != "Z" and b"phitune" in argv:
            found[argv[argv.index(b"phitune") + 1].decode()] = int(stat.parent.name)
    return found


def processes_of(data_dir: Path) -> list[int]:
    """Every live process running with this data dir in its environment: the service's, at any depth."""
    marker = f"PHITUNE_DATA_DIR={data_dir}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and _state(environ.parent) != "Z":
                found.append(int(environ.parent.name))
        except OSError:  # exited while we looked, or not ours
            continue
    return found


def _state(proc: Path) -> str:
    return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for(condition, timeout: float, service: Service, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} after {timeout}s:\n{service.tail_logs()}"
        time.sleep(0.2)
    return value


def serve_log(service: Service) -> str:
    return service.logs[0].read_text()


class HealthWatch:
    """Polls /healthz of the given servers in a thread and records every moment one did not answer."""

    def __init__(self, *urls: str) -> None:
        self.urls, self.failures, self._stop = urls, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            for url in self.urls:
                try:
                    # Generous: the restarting worker imports torch on the same two cores.
                    status = httpx.get(f"{url}/healthz", timeout=10).status_code
                except httpx.HTTPError as error:
                    status = repr(error)
                if status != 200:
                    self.failures.append((url, status))


@pytest.fixture
def short_lease_service(tmp_path: Path) -> Iterator[Service]:
    """`phitune serve` whose jobs are re-queued 15 s after their worker goes silent (heartbeat 1 s).

    Not shorter: a fresh worker imports torch after claiming its first job and before its first heartbeat,
    which takes about 7 s on two busy cores; a shorter lease would expire during that import.
    """
    yield from serving(tmp_path, lease_seconds="15")


@pytest.mark.e2e
def test_a_killed_child_is_restarted_and_sigterm_still_stops_them_all(embedded_service: Service):
    """One `serve` for all three steps: starting it is most of the cost."""
    serve = embedded_service.processes[0]
    before = children(serve.pid)
    assert set(before) == {"api", "worker", "inference"}

    with HealthWatch(embedded_service.base_url, embedded_service.inference_url) as watch:
        os.kill(before["worker"], signal.SIGKILL)
        after = wait_for(
            lambda: (c := children(serve.pid)).get("worker") not in (None, before["worker"]) and c,
            30,
            embedded_service,
            "no new worker",
        )
        time.sleep(1)  # the API and inference server keep answering while the new worker starts
    assert watch.failures == []
    assert after["api"] == before["api"] and after["inference"] == before["inference"]
    assert f"worker (pid {before['worker']}) exited with signal SIGKILL; restarting it in 1s" in serve_log(
        embedded_service
    )

    os.kill(before["api"], signal.SIGKILL)
    wait_for(
        lambda: children(serve.pid).get("api") not in (None, before["api"]),
        30,
        embedded_service,
        "no new API",
    )
    embedded_service.wait_ready(timeout=60)
    assert f"api (pid {before['api']}) exited with signal SIGKILL; restarting it in 1s" in serve_log(
        embedded_service
    )
    now = children(serve.pid)
    assert now["inference"] == before["inference"] and now["worker"] == after["worker"]

    # The new worker dies before it was stable, so it waits 2 s; SIGTERM arrives during that wait.
    os.kill(now["worker"], signal.SIGKILL)
    wait_for(lambda: "restarting it in 2s" in serve_log(embedded_service), 10, embedded_service, "no backoff")
    started = time.monotonic()
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=30) == 0
    assert time.monotonic() - started < 15  # the servers' grace; the worker was down
    assert processes_of(embedded_service.data_dir) == [], embedded_service.tail_logs()
    assert serve_log(embedded_service).count("worker restarted") == 1  # not again after the stop


@pytest.mark.e2e
def test_a_running_job_succeeds_after_its_worker_is_killed(short_lease_service: Service):
    service = short_lease_service
    serve = service.processes[0]
    worker = children(serve.pid)["worker"]
    with service.client as client:
        job = create_job(
            client,
            training_config={"num_train_epochs": 6, "logging_steps": 5, "per_device_train_batch_size": 4},
        )
        running = wait_for(
            lambda: (j := client.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["progress"]["step"] and j,
            120,
            service,
            "the job never made progress",
        )
        assert running["status"] == "running"
        os.kill(worker, signal.SIGKILL)

        job = wait_final(service, job["id"], timeout=180)
        assert job["status"] == "succeeded", f"{job['error']}\n{service.tail_logs()}"
        assert job["attempt"] >= max(2, running["attempt"] + 1)
        retried = f"Worker stopped responding; retrying as attempt {running['attempt'] + 1}"
        assert any(e["message"].startswith(retried) for e in all_events(client, job["id"]))
    assert children(serve.pid)["worker"] != worker

    # SIGTERM to serve stops the worker first: it saves its state and hands its job back to the API, still
    # up; the next `serve` resumes the job from there.
    with service.client as client:
        job = create_job(
            client,
            training_config={"num_train_epochs": 6, "logging_steps": 5, "per_device_train_batch_size": 4},
        )
        wait_for(
            lambda: client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"],
            120,
            service,
            "the second job never made progress",
        )
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=90) == 0
    assert processes_of(service.data_dir) == [], service.tail_logs()
    service.processes.remove(serve)
    port, inference_port = service.base_url.rsplit(":", 1)[1], service.inference_url.rsplit(":", 1)[1]
    service.start("serve-2", "serve", "--port", port, "--inference-port", inference_port)
    service.wait_ready(service.inference_url, timeout=120)
    job = wait_final(service, job["id"], timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2, service.tail_logs()
    with service.client as client:
        messages = [e["message"] for e in all_events(client, job["id"])]
    assert any("handed the job back (the worker is shutting down)" in m for m in messages)
    assert any(m.startswith("Resumed from step") for m in messages)


def test_backoff_doubles_and_a_child_deaf_to_sigterm_is_killed_after_its_grace():
    """The supervisor alone, on small real processes: three seconds, so not an e2e test."""
    lines: list[str] = []
    crashing = Child("crashing", ["sh", "-c", "exit 3"], grace_seconds=1)
    deaf = Child("deaf", ["sh", "-c", "trap '' TERM; sleep 60 & wait"], grace_seconds=0.5)
    supervisor = Supervisor([crashing, deaf], dict(os.environ), log=lines.append)
    # Crashes at once, again 1 s later, then waits 2 s: the stop comes during that wait.
    timer = threading.Timer(2.5, supervisor.request_stop)
    timer.start()
    supervisor.run()
    timer.join()
    assert [line.split(" exited with ")[1] for line in lines if "crashing" in line and "exited" in line] == [
        "status 3; restarting it in 1s",
        "status 3; restarting it in 2s",
    ]
    assert sum("crashing restarted" in line for line in lines) == 1
    assert "deaf did not stop within 0.5s; killing it" in lines
    assert deaf.process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while True:  # its `sleep` went with it: SIGKILL went to the whole process group
        try:
            os.killpg(deaf.process.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the deaf child's group outlived it"
        time.sleep(0.05)
