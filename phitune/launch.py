"""Starting `phitune` processes from outside them (tests, benchmarks, the quickstart) and waiting until they
serve: the one copy of "free port, spawn `python -m phitune`, poll /healthz"."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def phitune_command(*args: str) -> list[str]:
    """The command line of `phitune ARGS` with this interpreter (no installed entry point needed)."""
    return [sys.executable, "-m", "phitune", *args]


def run_phitune(*args: str, env: Mapping[str, str], timeout: float = 300) -> str:
    """Run `phitune ARGS` to completion and return its stdout; RuntimeError with its stderr if it fails."""
    done = subprocess.run(
        phitune_command(*args), env=dict(env), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"phitune {' '.join(args)} exited with status {done.returncode}:\n{done.stderr}")
    return done.stdout


def healthy(url: str) -> bool:
    """True when the server at `url` answers /healthz with 200."""
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, *, processes: Sequence[subprocess.Popen] = (), timeout: float = 120) -> None:
    """Wait until `url` is healthy; RuntimeError as soon as one of `processes` exits, or at the timeout."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if exited := [process for process in processes if process.poll() is not None]:
            args = exited[0].args  # [python, -m, phitune, command, …]
            command = str(args[3]) if isinstance(args, list | tuple) and len(args) > 3 else ""
            raise RuntimeError(f"phitune {command} exited with status {exited[0].returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer /healthz within {timeout:.0f} s")
        time.sleep(0.2)


def stop(process: subprocess.Popen, *, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running(
    args: list[str], url: str, *, env: Mapping[str, str], timeout: float = 120, **popen
) -> Iterator[subprocess.Popen]:
    """`phitune ARGS` serving at `url` until the block ends."""
    process = subprocess.Popen(phitune_command(*args), env=dict(env), cwd=REPO, **popen)
    try:
        wait_healthy(url, processes=[process], timeout=timeout)
        yield process
    finally:
        stop(process)
