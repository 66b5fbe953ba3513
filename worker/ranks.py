"""One rank of a data-parallel job (`python -m worker.ranks <inputs>`, started by torchrun from
`worker.distributed.launch`): the recipe, with rank 0 reporting to the worker and every rank stopping where
rank 0 says.

The trainer runs DDP itself from torchrun's RANK / LOCAL_RANK / WORLD_SIZE (gloo on the CPU, NCCL on GPUs);
the recipe saves checkpoints, resume states and the adapter on rank 0 only. Decisions that could differ
between ranks (stop, hand back, save a state now) are rank 0's, broadcast over a gloo group of their own.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from worker import hardware
from worker.distributed import FAILED, FINISHED, RankCall, connect, train_here

T = TypeVar("T")

_control: dist.ProcessGroup | None = None  # set in a rank of a multi-process job


class ReporterGone(RuntimeError):
    """The worker's reporter failed or is gone: this rank stops, and torchrun ends the others."""


def rank_zero_decides(value: T) -> T:
    """Rank 0's `value`, on every rank of a multi-process job (a collective: every rank must call it at
    the same point); `value` itself in a job of one process."""
    if _control is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def all_ranks_here() -> None:
    """Wait until every rank of a multi-process job has reached this point (nothing in one process)."""
    if _control is not None:
        dist.barrier(group=_control)


class RankReporter:
    """A ProgressReporter for one rank: rank 0 forwards every call to the worker's reporter; the other
    ranks report nothing, and take rank 0's answers to should_stop and hand_back."""

    def __init__(self, connection: Connection | None) -> None:
        self._connection = connection  # None on ranks other than 0

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._connection is None:
            return None
        try:
            self._connection.send(RankCall(name, args, kwargs))
            status, value = self._connection.recv()
        except (EOFError, OSError) as gone:
            raise ReporterGone(f"the worker's process is gone ({gone})") from None
        if status != "ok":
            raise ReporterGone(value)
        return value

    def message(self, text: str, *, level: str = "info", data: dict | None = None) -> None:
        self.call("message", text, level=level, data=data)

    def on_metrics(self, metrics: dict) -> None:
        self.call("on_metrics", metrics)

    def on_checkpoint(self, step: int, adapter_dir: Path, metrics: dict) -> None:
        self.call("on_checkpoint", step, adapter_dir, metrics)

    def on_resume_state(self, step: int, state_dir: Path) -> None:
        self.call("on_resume_state", step, state_dir)

    def should_stop(self) -> bool:
        return bool(rank_zero_decides(self.call("should_stop")))

    def hand_back(self) -> str | None:
        return rank_zero_decides(self.call("hand_back"))


def main(inputs_file: Path) -> None:
    global _control
    inputs = pickle.loads(inputs_file.read_bytes())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if inputs.device != "cpu" and hardware.cuda_problem() is None:
        torch.cuda.set_device(local_rank)  # before hardware.plan, which trains on the current device
        backend = "nccl"
    dist.init_process_group(backend)  # the trainer's accelerate state takes this group on
    _control = dist.new_group(backend="gloo")
    connection = None
    if rank == 0:
        connection = connect(os.environ)
    reporter = RankReporter(connection)
    try:
        result = train_here(inputs, reporter)
    except ReporterGone:
        raise
    except BaseException as problem:
        with contextlib.suppress(ReporterGone):  # the worker may be gone too
            reporter.call(FAILED, f"{type(problem).__name__}: {problem}")
        raise
    reporter.call(FINISHED, result)
    if connection is not None:
        connection.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
