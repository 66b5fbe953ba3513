"""The training worker's Prometheus metrics, served at /metrics on PHITUNE_WORKER_METRICS_PORT (off when
unset). A worker is one process training one job at a time (`--pool=solo`), so each process serves its own
port: give each worker on a machine its own, and scrape them all.

Training throughput is the gauge of the tokens per second the last logged step reported, and the counter of
tokens trained by finished attempts (`rate()` of it over a window is the sustained figure). GPU memory is read
from torch's allocator at scrape time, when torch has been imported and CUDA is in use.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()
JOBS_RUNNING = Gauge("phitune_worker_jobs_running", "Training attempts running now", registry=REGISTRY)
ATTEMPTS = Counter(
    "phitune_worker_attempts", "Training tasks ended, by how they ended", ["outcome"], registry=REGISTRY
)
STEP = Gauge("phitune_worker_training_step", "The running job's last logged step", registry=REGISTRY)
TOTAL_STEPS = Gauge(
    "phitune_worker_training_total_steps", "The running job's planned steps", registry=REGISTRY
)
TOKENS_PER_SECOND = Gauge(
    "phitune_worker_training_tokens_per_second",
    "Tokens per second of the running job's last logged step",
    registry=REGISTRY,
)
TRAINED_TOKENS = Counter(
    "phitune_worker_trained_tokens", "Tokens trained by attempts that ended", registry=REGISTRY
)


class GpuMemory:
    """torch's CUDA allocator, read at scrape time: nothing while torch is not loaded or has no GPU."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        family = GaugeMetricFamily(
            "phitune_worker_gpu_memory_bytes", "GPU memory held by torch's allocator", labels=["kind"]
        )
        family.add_metric(["allocated"], torch.cuda.memory_allocated())
        family.add_metric(["reserved"], torch.cuda.memory_reserved())
        family.add_metric(["peak_allocated"], torch.cuda.max_memory_allocated())
        yield family


REGISTRY.register(GpuMemory())


def observe_progress(metrics: dict[str, Any]) -> None:
    """A metrics event of the running job (`worker.recipe.ReporterCallback`): its step and throughput."""
    for gauge, key in (
        (STEP, "step"),
        (TOTAL_STEPS, "total_steps"),
        (TOKENS_PER_SECOND, "tokens_per_second"),
    ):
        if isinstance(value := metrics.get(key), int | float) and not isinstance(value, bool):
            gauge.set(value)


def serve(port: int) -> None:
    """Serve /metrics on `port`, all interfaces (a thread of the worker process)."""
    start_http_server(port, registry=REGISTRY)
