"""Upload benchmark: a large chat JSONL through `POST /v1/files`, real HTTP, streamed both ways.

A deterministic file of realistic chat rows (a system prompt on some, one to three user/assistant exchanges,
contents from a few words to a thousand characters, some of them not ASCII; about 1.45 kB a row; 4096
distinct rows, repeated) is uploaded to a real `phitune api` process (embedded defaults: SQLite, filesystem
storage; `PHITUNE_MAX_UPLOAD_BYTES` raised to fit) by a client that streams it from disk, and must be
accepted with the row count as its examples:

    upload_mb_s           file MB ÷ seconds from the first byte sent to the response (receive + validate)
    api_rss_growth_mb     the API process's (and its children's) peak RSS during the upload − its RSS before
    validate_mb_s         the validator alone, called in this process on the same file (`validate_file`: a
                          file this large in two processes, app.files.split_validation)
    receive_mb_s          upload_mb_s with the validator's share taken out: the rest of the request
                          (client, HTTP, multipart parsing, hashing, writing the temp file)
    api_cpu_seconds       CPU time of the API process during the upload (less sensitive than the rates to
                          other load on the machine)

MB is 10^6 bytes. `BENCH_UPLOAD_MB` sets the file's size (default 1000, i.e. 1 GB); the file, the API's data
directory and the upload all live in one temporary directory, removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from phitune.launch import free_port, run_phitune, running

DEFAULT_MB = 1000
SEED = 1234
POOL = 4096  # distinct rows; the file repeats them
SAMPLE_SECONDS = 0.02
MB = 1_000_000

SYSTEM_PROMPTS = [
    "You are a helpful assistant for an online hardware store. Answer briefly and politely.",
    "You are a customer support agent for a coffee machine maker. Be precise; quote the manual when useful.",
    "Tu es un assistant qui répond en français, de façon concise.",
    "You answer questions about Python and its standard library. Prefer short code examples.",
]
_WORD_TEXT = (
    "the machine water filter descale button press hold seconds light blinks warranty order refund "
    "delivery package address invoice python list dict function return value error exception import "
    "module file line read write server request response token model adapter training dataset step "
    "because however therefore usually sometimes please thanks café naïve über 日本 データ"
)
WORDS = _WORD_TEXT.split()


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ".\n\n", ":\n- item\n- item\n"])


def content(rng: random.Random, low: int, high: int) -> str:
    """Sentences up to a length drawn from [low, high] characters."""
    target = rng.randint(low, high)
    parts: list[str] = []
    length = 0
    while length < target:
        part = sentence(rng, rng.randint(4, 25))
        parts.append(part)
        length += len(part) + 1
    return " ".join(parts)


def chat_row(rng: random.Random) -> dict[str, object]:
    messages: list[dict[str, object]] = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choice([1, 1, 1, 1, 2, 3])):
        messages.append({"role": "user", "content": content(rng, 20, 300)})
        messages.append({"role": "assistant", "content": content(rng, 40, 1000)})
    if rng.random() < 0.1 and messages[-3:][0]["role"] == "assistant":
        messages[-3]["weight"] = 0  # an earlier assistant turn not trained on
    return {"messages": messages}


def generate(path: Path, size: int, seed: int = SEED) -> int:
    """Write chat rows to `path` until it holds at least `size` bytes; the number of rows."""
    rng = random.Random(seed)
    pool = [(json.dumps(chat_row(rng), ensure_ascii=False) + "\n").encode() for _ in range(POOL)]
    rows = written = 0
    with path.open("wb", buffering=8 * 1024 * 1024) as out:
        while written < size:
            line = pool[rows % POOL]
            out.write(line)
            written += len(line)
            rows += 1
    return rows


def validate_in_process(path: Path) -> tuple[float, int]:
    """The validator alone on `path`, as the upload request runs it: seconds, examples."""
    from app.files.service import validate_file
    from app.files.upload import ReceivedFile

    received = ReceivedFile(path, path.name, path.stat().st_size, "")
    start = time.perf_counter()
    report = validate_file(received)
    elapsed = time.perf_counter() - start
    if not report.ok:
        raise RuntimeError(f"the generated file is invalid: {report.problems[:3]}")
    return elapsed, report.examples


class RssSampler:
    """The peak RSS of a process and its children, sampled from /proc every SAMPLE_SECONDS (and VmHWM, so
    that a peak between two samples of the API process itself is not missed)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.rss()
        self._hwm_before = _status_kb(pid, "VmHWM")
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        """KiB, the process and its descendants."""
        return sum(_status_kb(pid, "VmRSS") for pid in [self.pid, *_descendants(self.pid)])

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        hwm = _status_kb(self.pid, "VmHWM")
        if hwm > self._hwm_before:  # the API process's own peak was reached during the upload
            self.peak = max(self.peak, hwm + self.rss() - _status_kb(self.pid, "VmRSS"))

    @property
    def growth_mb(self) -> float:
        return round((self.peak - self.before) * 1024 / MB, 1)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.rss())


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload(base_url: str, key: str, path: Path, pid: int) -> tuple[float, float, float, dict[str, object]]:
    """POST the file, streamed from disk: seconds, the API's RSS growth (MB) and CPU seconds, and the file
    object."""
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(60, read=1800)) as client,
        path.open("rb") as stream,
    ):
        with RssSampler(pid) as sampler:
            cpu = cpu_seconds(pid)
            start = time.perf_counter()
            response = client.post(
                "/v1/files",
                files={"file": (path.name, stream, "application/jsonl")},
                data={"purpose": "fine-tune"},
            )
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds(pid) - cpu
        response.raise_for_status()
        return elapsed, sampler.growth_mb, cpu, response.json()


@contextlib.contextmanager
def api_process(env: dict[str, str], port: int) -> Iterator[tuple[str, int]]:
    """`phitune api` on `port` until the block ends: its URL and pid."""
    base_url = f"http://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with running(["api", "--port", str(port)], base_url, env=env, timeout=60, **quiet) as process:
        yield base_url, process.pid


def run() -> dict[str, object]:
    """The whole benchmark, from scratch in a temporary directory."""
    size = int(float(os.environ.get("BENCH_UPLOAD_MB", DEFAULT_MB)) * MB)
    with tempfile.TemporaryDirectory(prefix="phitune-bench-") as scratch:
        root = Path(scratch)
        path = root / "upload.jsonl"
        rows = generate(path, size)
        size = path.stat().st_size
        validate_seconds, examples = validate_in_process(path)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")} | {
            "PHITUNE_DATA_DIR": str(root / "data"),
            "PHITUNE_API_URL": f"http://127.0.0.1:{port}",
            "PHITUNE_MAX_UPLOAD_BYTES": str(size + MB),
        }
        run_phitune("migrate", env=env)
        key = run_phitune("keys", "create", "--tenant", "bench", env=env).strip().splitlines()[-1]
        with api_process(env, port) as (base_url, pid):
            seconds, growth_mb, api_cpu, file = upload(base_url, key, path, pid)
    stats = file.get("stats") or {}
    if file.get("bytes") != size or stats.get("examples") != rows or examples != rows:
        raise RuntimeError(
            f"uploaded {file.get('bytes')} bytes, {stats.get('examples')} examples; sent {rows}"
        )
    upload_mb_s = size / MB / seconds
    return {
        "upload_mb_s": round(upload_mb_s, 1),
        "api_rss_growth_mb": growth_mb,
        "validate_mb_s": round(size / MB / validate_seconds, 1),
        "receive_mb_s": round(size / MB / max(seconds - validate_seconds, 1e-9), 1),
        "seconds": round(seconds, 2),
        "validate_seconds": round(validate_seconds, 2),
        "api_cpu_seconds": round(api_cpu, 2),
        "file_mb": round(size / MB, 1),
        "rows": rows,
        "mean_row_bytes": round(size / rows),
        "path": "httpx client -> phitune api (SQLite, filesystem storage); validated in two processes",
    }
