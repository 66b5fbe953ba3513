"""The supervisor behind `phitune serve`: keeps its child processes running until told to stop.

A child that dies is restarted after an exponential backoff (so one that crashes at start-up does not spin)
while the others keep running. SIGTERM / SIGINT stops every child: SIGTERM, the child's grace period, then
SIGKILL to its process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
STABLE_SECONDS = 60.0  # a child that stayed up this long starts its backoff from the beginning again
POLL_SECONDS = 0.2


def describe_status(returncode: int) -> str:
    """`status 1`, or `signal SIGKILL` for a child that a signal killed (negative return code)."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


@dataclass
class Child:
    """One supervised command and the state of its current incarnation."""

    name: str
    argv: list[str]
    grace_seconds: float
    # Children stop in waves of rising stop_wave: the worker first, while the API it hands its job back to
    # is still up; then the servers.
    stop_wave: int = 0
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0  # deaths in a row without a stable run: the exponent of the next delay
    restart_at: float | None = None  # set while the child waits out its backoff

    def backoff(self) -> float:
        return min(BACKOFF_FIRST_SECONDS * 2**self.failures, BACKOFF_MAX_SECONDS)


class Supervisor:
    """Runs children until `request_stop()` (or SIGTERM / SIGINT, in `run`), restarting any that die."""

    def __init__(
        self,
        children: list[Child],
        env: dict[str, str],
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.children = children
        self.env = env
        self.log = log or (lambda line: print(f"phitune serve: {line}", file=sys.stderr, flush=True))
        self.stopping = False

    def request_stop(self, *_signal_args: object) -> None:
        """Only sets a flag: safe in a signal handler; the loop in `run` does the stopping."""
        self.stopping = True

    def run(self, on_started: Callable[[], None] | None = None) -> None:
        """Start every child, supervise them until SIGTERM / SIGINT, then stop them all (main thread)."""
        # Handlers first, so a signal that arrives while the children start is not lost.
        previous = {
            signum: signal.signal(signum, self.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for child in self.children:
                if not self.stopping:
                    self._start(child)
            if on_started and not self.stopping:
                on_started()
            while not self.stopping:
                self.check()
                time.sleep(POLL_SECONDS)
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def check(self) -> None:
        """One round: schedule a restart for each child that died, start those whose delay is over."""
        now = time.monotonic()
        for child in self.children:
            if self.stopping:
                return
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            if child.process is None or (code := child.process.poll()) is None:
                continue
            _kill_group(child.process)  # anything it left behind would hold its port or GPU
            if now - child.started_at >= STABLE_SECONDS:
                child.failures = 0
            delay = child.backoff()
            child.failures += 1
            child.restart_at = now + delay
            self.log(
                f"{child.name} (pid {child.process.pid}) exited with {describe_status(code)}; "
                f"restarting it in {delay:g}s"
            )

    def stop(self) -> None:
        """Wave by wave (`Child.stop_wave`): SIGTERM every running child, wait up to its grace period, then
        SIGKILL its process group."""
        self.stopping = True
        for child in self.children:
            child.restart_at = None  # a child waiting out its backoff stays down
        for wave in sorted({child.stop_wave for child in self.children}):
            self._stop_wave([child for child in self.children if child.stop_wave == wave])

    def _stop_wave(self, children: list[Child]) -> None:
        running = [(c, c.process) for c in children if c.process is not None and c.process.poll() is None]
        for _, process in running:
            process.terminate()
        started = time.monotonic()
        for child, process in running:
            try:
                process.wait(timeout=max(0.0, started + child.grace_seconds - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{child.name} did not stop within {child.grace_seconds:g}s; killing it")
            _kill_group(process)  # the child, if it is still there, and whatever it started
            process.wait()

    def _start(self, child: Child) -> None:
        # A new session each, so a terminal's Ctrl-C reaches only the supervisor, which stops them in order,
        # and each child's process group can be killed as a whole.
        child.process = subprocess.Popen(child.argv, env=self.env, start_new_session=True)
        child.started_at = time.monotonic()
        child.restart_at = None
        if child.failures:
            self.log(f"{child.name} restarted (pid {child.process.pid})")


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
