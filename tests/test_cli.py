"""The `phitune` command line, run as a user runs it."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from phitune.launch import REPO, phitune_command


def phitune(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")} | {
        "PHITUNE_DATA_DIR": str(data_dir)
    }
    return subprocess.run(
        phitune_command(*args),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keys_need_a_migrated_database_and_print_the_key_last(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    refused = phitune(data_dir, "keys", "create", "--tenant", "acme")
    assert refused.returncode == 1 and "run `phitune migrate` first" in refused.stderr
    assert phitune(data_dir, "migrate").returncode == 0
    created = phitune(data_dir, "keys", "create", "--tenant", "acme")
    assert created.returncode == 0
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("pt-") and len(key) > 40


# The HTTP commands against a fake server that misbehaves as a hostile server or a broken proxy would.

JOB = {
    "id": "ftjob-fake",
    "object": "fine_tuning.job",
    "status": "succeeded",
    "model": "tiny-phi3",
    "created_at": 1_700_000_000,
    "finished_at": 1_700_000_010,
    "fine_tuned_model": "ft:tiny-phi3:fake:1",
    "trained_tokens": 100,
    "progress": {"step": 4, "total_steps": 4, "percent": 100},
    "error": None,
}
METRICS = {"step": 4, "total_steps": 4, "epoch": 1.0, "train_loss": 0.5, "tokens_per_second": 10.0}
SECRET_KEY = "pt-secret-" + "s" * 30
ESCAPE = "\x1b]0;pwned\x07\x1b[2J"  # a terminal's title set, then its screen cleared
# The names the fake server gives downloads, and where the CLI saves each (its own name for a bad one).
NAMES = [
    "../../escaped.tar.gz",
    "/etc/cron.d/evil",
    "..\\..\\windows.tar.gz",
    "..",
    ".bashrc",
    "",
    "slow.tgz",
]
SAVED = ["escaped.tar.gz", "evil", "windows.tar.gz", "3.peft.tar.gz", "4.peft.tar.gz", "5.peft.tar.gz"]


class FakeApi(http.server.BaseHTTPRequestHandler):
    """Answers by path; `hang` paths send a first part, then nothing, until the client goes."""

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes, kind: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def hang(self, kind: str, first: bytes, **headers: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(first)
        self.wfile.flush()
        with contextlib.suppress(OSError):
            for _ in range(600):  # a minute at most
                time.sleep(0.1)
                self.wfile.write(b": keep-alive\n\n" if "event-stream" in kind else b"x" * 1024)
                self.wfile.flush()

    def sse(self, *data: str) -> None:
        self.send(200, "".join(f"data: {d}\n\n" for d in data).encode(), "text/event-stream")

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        job = "/v1/fine_tuning/jobs/ftjob-fake"
        if path == "/v1/models":  # a proxy in front of a server that is down
            self.send(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html")
        elif path == "/v1/files":  # a web server that is not phitune
            self.send(200, b"<!doctype html><html>Welcome to nginx!</html>", "text/html")
        elif path == job:
            self.send(200, json.dumps(JOB).encode(), "application/json")
        elif path == f"{job}/events":
            metrics = {"type": "metrics", "level": "info", "message": "", "created_at": 1, "data": METRICS}
            message = {
                "type": "message",
                "level": "info",
                "message": f"Training started{ESCAPE}",
                "created_at": 1,
            }
            self.sse(json.dumps(message), json.dumps(metrics), "{}")
        elif path == "/v1/files/file-escape":
            error = {"error": {"message": f"No such file{ESCAPE}", "code": "file_not_found"}}
            self.send(404, json.dumps(error).encode(), "application/json")
        elif path == "/v1/fine_tuning/jobs/ftjob-garbled/events":
            self.sse("<html>not json</html>")
        elif path == "/v1/fine_tuning/jobs/ftjob-endless/events":
            self.hang("text/event-stream", b"data: " + b"x" * (17 * 1024 * 1024))
        elif path == "/v1/fine_tuning/jobs/ftjob-slow/events":
            self.hang("text/event-stream", b": keep-alive\n\n")
        elif path.startswith("/v1/fine_tuning/jobs/ftjob-") and path.endswith("/adapter"):
            # The file name the test asks for, as ?checkpoint=ITS_INDEX in NAMES.
            checkpoint = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("checkpoint", [""])
            name = NAMES[int(checkpoint[0])] if checkpoint[0].isdigit() else "adapter.tar.gz"
            disposition = {"Content_Disposition": f'attachment; filename="{name}"'}
            if "ftjob-slow" in path:
                self.hang("application/gzip", b"partial", **disposition)
            else:
                self.send(200, b"archive bytes", "application/gzip", **disposition)
        else:
            self.send(
                404, b'{"error": {"message": "No such thing", "code": "not_found"}}', "application/json"
            )

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/v1/fine_tuning/jobs" and json.loads(body).get("dry_run"):
            self.send(200, json.dumps(UNCOUNTED_ESTIMATE).encode(), "application/json")
        elif self.path == "/v1/fine_tuning/jobs":
            self.send(200, json.dumps({**JOB, "status": "queued"}).encode(), "application/json")
        elif self.path == "/v1/chat/completions":
            chunk = {"choices": [{"delta": {"content": "Hel"}}]}
            self.hang("text/event-stream", f"data: {json.dumps(chunk)}\n\n".encode())
        else:
            self.send(404, b"{}", "application/json")


# A dry run on a file whose tokens the API could not count (a preference file).
UNCOUNTED_ESTIMATE = {
    "object": "fine_tuning.job.estimate",
    "model": "tiny-phi3",
    "training_file": "file-pairs",
    "training_config": {"max_seq_length": 2048, "num_train_epochs": 3},
    "examples": None,
    "steps_per_epoch": None,
    "total_steps": None,
    "trained_tokens": None,
    "estimated_seconds": None,
    "estimated_memory_gb": 0.01,
    "basis": "No steps or time: a preference file's tokens are not counted.",
}


@pytest.fixture(scope="module")
def fake_api() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def client_env(base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")}
    return env | {"PHITUNE_BASE_URL": base_url, "PHITUNE_API_KEY": SECRET_KEY}


def run_client(base_url: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    done = subprocess.run(
        phitune_command(*args), env=client_env(base_url), cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert SECRET_KEY not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "\x1b" not in done.stdout + done.stderr  # no escape sequence from the server reaches the terminal
    return done


def test_a_page_that_is_not_phitunes_is_an_error_not_a_traceback(fake_api: str) -> None:
    proxy = run_client(fake_api, "models", "list")
    assert proxy.returncode == 1 and proxy.stdout == ""
    assert proxy.stderr.startswith("Error: HTTP 502: <html>") and "502 Bad Gateway" in proxy.stderr
    nginx = run_client(fake_api, "files", "list", "--json")
    assert nginx.returncode == 1 and nginx.stdout == ""
    assert f"Error: {fake_api} answered HTTP 200 with text/html, not phitune's JSON" in nginx.stderr
    escaped = run_client(fake_api, "files", "get", "file-escape")
    assert escaped.returncode == 1 and "\x1b" not in escaped.stderr
    assert "Error: No such file\\x1b]0;pwned\\x07\\x1b[2J (HTTP 404, code file_not_found)" in escaped.stderr
    garbled = run_client(fake_api, "jobs", "events", "ftjob-garbled", "--follow")
    assert garbled.returncode == 1 and "Error: the server sent an event that is not JSON" in garbled.stderr
    endless = run_client(fake_api, "jobs", "watch", "ftjob-endless")
    assert endless.returncode == 1 and "sent a line of more than 16,777,216 characters" in endless.stderr


def test_a_dry_run_without_counts_says_unknown(fake_api: str) -> None:
    done = run_client(
        fake_api, "jobs", "create", "--model", "tiny-phi3", "--training-file", "file-pairs", "--dry-run"
    )
    assert done.returncode == 0, done.stderr
    assert "unknown examples" in done.stdout and "Steps unknown, tokens unknown, time unknown" in done.stdout
    assert "None" not in done.stdout and "memory 0.01 GiB" in done.stdout


def test_credentials_in_the_url_are_not_printed() -> None:
    unreachable = run_client("http://user:hunter2@127.0.0.1:9", "models", "list")
    assert unreachable.returncode == 1 and "cannot reach phitune at http://127.0.0.1:9" in unreachable.stderr
    assert "hunter2" not in unreachable.stderr


def test_json_with_watch_prints_only_the_ended_job_on_stdout(fake_api: str) -> None:
    create = ["jobs", "create", "--model", "tiny-phi3", "--training-file", "file-x", "--watch", "--json"]
    done = run_client(fake_api, *create)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == JOB
    assert "Training started" in done.stderr and "step 4/4" in done.stderr
    assert "✔ ftjob-fake succeeded" in done.stderr
    assert "Training started\\x1b]0;pwned\\x07\\x1b[2J" in done.stderr  # the server's escapes, shown
    shown = run_client(fake_api, *create[:-1])
    assert "step 4/4" in shown.stdout and "✔ ftjob-fake succeeded" in shown.stdout
    watched = run_client(fake_api, "jobs", "watch", "ftjob-fake", "--json")
    assert watched.returncode == 0 and json.loads(watched.stdout) == JOB and "step 4/4" in watched.stderr


@pytest.mark.parametrize("index", range(len(SAVED)))
def test_a_download_stays_in_its_directory(fake_api: str, tmp_path: Path, index: int) -> None:
    into, saved = tmp_path / "a" / "b", SAVED[index]
    into.mkdir(parents=True)
    done = run_client(fake_api, "jobs", "download", "ftjob-fake", "-o", str(into), "--checkpoint", str(index))
    assert done.returncode == 0, done.stderr
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()] == [
        f"a/b/{saved}"
    ]
    assert (into / saved).read_bytes() == b"archive bytes"


def test_a_download_never_replaces_a_file_without_force(fake_api: str, tmp_path: Path) -> None:
    mine = tmp_path / "adapter.tar.gz"
    mine.write_bytes(b"mine")
    refused = run_client(fake_api, "jobs", "download", "ftjob-fake", "-o", str(mine))
    assert refused.returncode == 1 and f"Error: {mine} exists; give --force to replace it" in refused.stderr
    assert mine.read_bytes() == b"mine"
    (tmp_path / "escaped.tar.gz").write_bytes(b"mine too")
    refused = run_client(fake_api, "jobs", "download", "ftjob-fake", "-o", str(tmp_path), "--checkpoint", "0")
    assert refused.returncode == 1 and "escaped.tar.gz exists" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.tar.gz", "escaped.tar.gz"]
    assert run_client(fake_api, "jobs", "download", "ftjob-fake", "-o", str(mine), "--force").returncode == 0
    assert mine.read_bytes() == b"archive bytes"


def interrupt(base_url: str, *args: str, ready: Callable[[], bool], cwd: Path = REPO, stdin: str = "") -> int:
    """Run `phitune ARGS`, press Ctrl-C (SIGINT) once `ready()`, and return its exit status."""
    process = subprocess.Popen(
        phitune_command(*args),
        env=client_env(base_url),
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    process.stdin.write(stdin)
    process.stdin.flush()
    deadline = time.monotonic() + 60
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert "Traceback" not in err and SECRET_KEY not in out + err, err
    return process.returncode


def test_ctrl_c_ends_a_download_watch_or_chat_with_status_130(fake_api: str, tmp_path: Path) -> None:
    # A download: nothing is left behind, neither the file nor a partial one.
    status = interrupt(
        fake_api,
        "jobs",
        "download",
        "ftjob-slow",
        "--checkpoint",
        "6",
        cwd=tmp_path,
        ready=lambda: any(tmp_path.iterdir()),
    )
    assert status == 130 and list(tmp_path.iterdir()) == []
    started = time.monotonic()
    status = interrupt(fake_api, "jobs", "watch", "ftjob-slow", ready=lambda: time.monotonic() > started + 3)
    assert status == 130
    started = time.monotonic()
    status = interrupt(fake_api, "chat", "tiny-phi3", "Hi", ready=lambda: time.monotonic() > started + 3)
    assert status == 130
    started = time.monotonic()
    status = interrupt(fake_api, "chat", "tiny-phi3", ready=lambda: time.monotonic() > started + 3, stdin="")
    assert status == 130
