"""Where a job trains: in the worker's process, or in data-parallel child processes launched by torchrun.

A job of `training_config.num_processes` > 1, and every job of a worker that owns several devices
(`PHITUNE_WORKER_DEVICES`), trains in `num_processes` ranks of `torchrun --standalone` (DDP: one GPU each,
or gloo processes on the CPU), running `worker.ranks`, which calls the same recipe. The worker's process
stays the one that talks to the API (claim, heartbeat, events, uploads, the outcome): rank 0 calls its
`ProgressReporter` through a local authenticated connection (`listen` / `connect`: `RankCall`s, answered in
order), and tells the other ranks what it answered to "stop?" and "hand back?", so that every rank stops at
the same step.

The ranks run in a process group of their own: a cancel, a pause or a shutdown stops them at the next step
through the reporter; ranks still running `STOP_GRACE_SECONDS` after a stop was asked, or when the worker's
task ends in any other way, are killed as a group. A rank that loses its connection to the worker fails, and
torchrun then ends the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.devices import VISIBLE, visible_gpus

if TYPE_CHECKING:
    from worker.recipe import ProgressReporter, RecipeInputs, RecipeResult

log = logging.getLogger(__name__)

ADDRESS_ENV = "PHITUNE_RANK_ADDRESS"  # the Unix socket where rank 0 reaches the worker
AUTHKEY_ENV = "PHITUNE_RANK_AUTHKEY"  # hex: the connection's HMAC key, never on a command line
REPORTER_CALLS = frozenset(
    {"message", "on_metrics", "on_checkpoint", "on_resume_state", "should_stop", "hand_back"}
)
FINISHED = "finished"  # rank 0's last call: the RecipeResult
FAILED = "failed"  # rank 0's last call when training raised: "<type>: <message>", as a job's error
STOP_GRACE_SECONDS = 120.0
"""How long ranks told to stop may take to finish their step before they are killed."""
POLL_SECONDS = 0.2


class TooFewDevices(ValueError):
    """The job asks for more processes than this worker owns devices."""


class RanksFailed(RuntimeError):
    """The training processes failed; the message is rank 0's error, else the end of their log."""


@dataclass(frozen=True)
class RankCall:
    """One call of rank 0 to the worker: a ProgressReporter method, FINISHED or FAILED."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None


def check_devices(num_processes: int, worker_devices: int) -> None:
    """Refuse, before anything is downloaded, a job asking more processes than the worker owns devices."""
    if num_processes > worker_devices:
        raise TooFewDevices(
            f"training_config.num_processes is {num_processes}, but this worker owns {worker_devices} "
            f"device{'s' if worker_devices > 1 else ''} (PHITUNE_WORKER_DEVICES={worker_devices}); run the "
            "job on a worker that owns enough, or ask for fewer processes"
        )


def run(inputs: RecipeInputs, reporter: ProgressReporter, *, worker_devices: int) -> RecipeResult:
    """Train the job here, or in its ranks when it asks for several or the worker owns several devices."""
    processes = inputs.training_config.num_processes
    check_devices(processes, worker_devices)
    if processes == 1 and worker_devices == 1:
        return train_here(inputs, reporter)
    return launch(inputs, reporter, processes)


def train_here(inputs: RecipeInputs, reporter: ProgressReporter) -> RecipeResult:
    """Train the job in this process (or rank) with its method's trainer."""
    if inputs.dpo is not None:
        from worker.dpo import run_dpo

        return run_dpo(inputs, reporter)
    from worker.recipe import run_recipe

    return run_recipe(inputs, reporter)


@contextlib.contextmanager
def listen() -> Iterator[tuple[Listener, dict[str, str]]]:
    """The worker's end of rank 0's connection, and the environment that tells rank 0 (`connect`) how to
    reach it. A Unix socket in a fresh private (0700) directory, not a port on 127.0.0.1: any local process
    could connect to that, and the listener accepts once, so one that knocked first would leave rank 0
    hanging and the job with it."""
    authkey = secrets.token_bytes(32)
    with (
        tempfile.TemporaryDirectory(prefix="phitune-ranks-") as private,
        Listener(str(Path(private) / "worker.sock"), family="AF_UNIX", authkey=authkey) as listener,
    ):
        yield listener, {ADDRESS_ENV: str(listener.address), AUTHKEY_ENV: authkey.hex()}


def connect(environ: Mapping[str, str]) -> Connection:
    """Rank 0's end of the connection `listen` made, from the environment it handed down."""
    return Client(environ[ADDRESS_ENV], family="AF_UNIX", authkey=bytes.fromhex(environ[AUTHKEY_ENV]))


def launch(inputs: RecipeInputs, reporter: ProgressReporter, processes: int) -> RecipeResult:
    """Train in `processes` torchrun ranks, serving rank 0's reporter calls until they exit."""
    scratch = inputs.output_dir.parent
    inputs_file, log_file = scratch / "rank-inputs.pickle", scratch / "ranks.log"
    inputs_file.write_bytes(pickle.dumps(inputs))
    with listen() as (listener, reach), log_file.open("wb") as output:
        env = {**os.environ, **reach}
        if VISIBLE in os.environ:  # the job's ranks take the first of the worker's GPUs, one each
            env[VISIBLE] = ",".join(visible_gpus(os.environ)[:processes])
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"),
            *("-m", "worker.ranks", str(inputs_file)),
        ]
        # A session of their own: the group is killed as one, and a terminal's Ctrl-C reaches only the worker,
        # which hands the job back through the reporter.
        ranks = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        served = _Served(reporter)
        server = threading.Thread(target=served.serve, args=(listener,), name="rank-reporter", daemon=True)
        server.start()
        try:
            _wait(ranks, reporter)
        finally:
            _kill_group(ranks)
        server.join(timeout=5)
    inputs_file.unlink(missing_ok=True)
    return _outcome(ranks.returncode, served, log_file)


class _Served:
    """Rank 0's calls, answered by the worker's reporter one at a time, and how they ended."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self.result: RecipeResult | None = None
        self.error: str | None = None
        self.problem: BaseException | None = None  # the reporter's own failure (an upload, the API)

    def serve(self, listener: Listener) -> None:
        while True:
            try:
                connection = listener.accept()
            except AuthenticationError:  # not rank 0 (it holds the key): wait for rank 0 still
                log.warning("refused a connection to the training processes' socket without their key")
                continue
            except OSError:  # the ranks ended before rank 0 connected; the listener is closed
                return
            break
        with connection:
            self._answer(connection)

    def _answer(self, connection: Connection) -> None:
        while True:
            try:
                call: RankCall = connection.recv()
            except (EOFError, OSError):
                return
            if call.name == FINISHED:
                self.result = call.args[0]
            elif call.name == FAILED:
                self.error = call.args[0]
            if call.name not in REPORTER_CALLS:
                if not _send(connection, ("ok", None)):
                    return
                continue
            try:
                value = getattr(self.reporter, call.name)(*call.args, **(call.kwargs or {}))
            except Exception as problem:  # fails the job as it would in one process; rank 0 stops on it
                self.problem = problem
                _send(connection, ("error", f"{type(problem).__name__}: {problem}"))
                return
            if not _send(connection, ("ok", value)):
                return


def _send(connection: Connection, reply: tuple[str, Any]) -> bool:
    """Answer rank 0; False once it is gone (killed while the reporter was answering)."""
    try:
        connection.send(reply)
    except OSError:
        return False
    return True


def _wait(ranks: subprocess.Popen, reporter: ProgressReporter) -> None:
    """Wait for the ranks to exit; once the reporter says stop, give them STOP_GRACE_SECONDS to."""
    stop_asked: float | None = None
    while ranks.poll() is None:
        if stop_asked is None and reporter.should_stop():
            stop_asked = time.monotonic()
        if stop_asked is not None and time.monotonic() - stop_asked > STOP_GRACE_SECONDS:
            log.warning("the training processes did not stop within %.0f s; killing them", STOP_GRACE_SECONDS)
            return
        time.sleep(POLL_SECONDS)


def _kill_group(ranks: subprocess.Popen) -> None:
    """Kill torchrun and every rank (they share its process group), leaving no process behind."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(ranks.pid, sig)
        except ProcessLookupError:  # the whole group has exited
            break
        try:
            ranks.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(POLL_SECONDS)  # ranks torchrun did not reap get the SIGKILL too


def _outcome(returncode: int, served: _Served, log_file: Path) -> RecipeResult:
    if served.problem is not None:
        raise served.problem
    if served.result is not None and returncode == 0:
        return served.result
    if served.error is not None:
        raise RanksFailed(served.error)
    if served.result is None and returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-40:]
        log.warning("the training processes failed (exit status %s):\n%s", returncode, "\n".join(tail))
    from worker.recipe import RecipeResult

    # Killed after a stop was asked (cancelled, lease lost, timed out): nothing was kept.
    if served.result is None and served.reporter.should_stop():
        return RecipeResult(None, 0, 0, None, cancelled=True, best_step=None, formats=[])
    raise RanksFailed(f"the training processes failed (exit status {returncode}); see the worker's log")
