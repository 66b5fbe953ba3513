"""Which GPUs a process may see, set through `CUDA_VISIBLE_DEVICES` before torch loads (torch reads it once).

A training worker owns `PHITUNE_WORKER_DEVICES` GPUs (default one): a job trains in the worker's process on
one, or, with several, in data-parallel child processes each pinned to one of them (`worker.distributed`), so
the trainer never wraps a model in `nn.DataParallel` and a job's batch and learning-rate schedule depend on
its own settings, not on the host. `phitune serve` puts its worker and its inference server on different
GPUs when there are two or more.
"""

from __future__ import annotations

from collections.abc import Mapping

VISIBLE = "CUDA_VISIBLE_DEVICES"


def pin_gpus(environ: Mapping[str, str], gpu: int | None, count: int) -> str:
    """The `CUDA_VISIBLE_DEVICES` of a worker owning `count` GPUs from `gpu` on (see `pin_one_gpu`)."""
    first = pin_one_gpu(environ, gpu)
    if count == 1 or not first:
        return first
    visible = _listed(environ)
    start = visible.index(first) if visible is not None else int(first)
    pinned = visible[start : start + count] if visible is not None else [str(start + i) for i in range(count)]
    if len(pinned) < count:
        raise ValueError(
            f"PHITUNE_WORKER_DEVICES={count} from GPU {first}, but only {len(pinned)} GPUs are left"
        )
    return ",".join(pinned)


def pin_one_gpu(environ: Mapping[str, str], gpu: int | None) -> str:
    """The `CUDA_VISIBLE_DEVICES` of a worker on GPU `gpu` (else `PHITUNE_GPU`, else the first), counted
    among the GPUs `environ` makes visible. Harmless on a machine without GPUs."""
    if gpu is None and environ.get("PHITUNE_GPU", "").strip():
        gpu = int(environ["PHITUNE_GPU"])
    if gpu is not None and gpu < 0:
        raise ValueError(f"--gpu {gpu}: GPUs are numbered from 0")
    visible = _listed(environ)
    if visible is None:  # every GPU of the machine is visible, numbered from 0 (a missing one: no GPU)
        return str(gpu or 0)
    if gpu is None:
        return visible[0] if visible else ""
    if not 0 <= gpu < len(visible):
        raise ValueError(
            f"--gpu {gpu}, but only {len(visible)} GPUs are visible ({VISIBLE}={environ[VISIBLE]})"
        )
    return visible[gpu]


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs this process may hand out: `CUDA_VISIBLE_DEVICES` when set, else every GPU torch finds."""
    listed = _listed(environ)
    if listed is not None:
        return listed
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def gpu_assignment(gpus: int) -> dict[str, int]:
    """`phitune serve`'s children → the index of their GPU (`--gpu`): training and inference apart when
    there are two or more, sharing the one there is, none on a machine without GPUs."""
    if gpus == 0:
        return {}
    return {"worker": 0, "inference": 1 if gpus > 1 else 0}


def _listed(environ: Mapping[str, str]) -> list[str] | None:
    if VISIBLE not in environ:
        return None
    return [device.strip() for device in environ[VISIBLE].split(",") if device.strip() not in ("", "-1")]
