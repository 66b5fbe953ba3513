"""The inference server's Prometheus metrics (GET /metrics): tokens generated (their rate is the server's
tokens per second), the time to each completion's first token, and each base model's adapter cache, read at
scrape time (hits: a lease of a loaded adapter; misses: a load, from the host copy or by download;
evictions: unloads to make room)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily

# Seconds: a prompt on a loaded adapter answers in milliseconds; one waiting for a download, in seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AdapterCacheCollector:
    """Each served model's adapter cache counters (`worker.serving.adapters.AdapterCache`)."""

    def __init__(self, models: Callable[[], Mapping[str, Any]]) -> None:
        self.models = models  # model id -> an object with `.adapters`, read at scrape time

    def collect(self) -> Iterator[CounterMetricFamily]:
        families = {
            name: CounterMetricFamily(
                f"phitune_inference_adapter_{name}", text, labels=["model", "source"][:n]
            )
            for name, text, n in (
                ("hits", "Requests for an adapter already loaded", 1),
                ("misses", "Adapter loads, by where the weights came from", 2),
                ("evictions", "Adapters unloaded to make room", 1),
            )
        }
        for model_id, served in self.models().items():
            cache = served.adapters
            families["hits"].add_metric([model_id], cache.hits)
            families["misses"].add_metric([model_id, "download"], cache.counters["adapter_downloads"])
            families["misses"].add_metric([model_id, "host"], cache.counters["adapter_host_hits"])
            families["evictions"].add_metric([model_id], cache.evictions)
        yield from families.values()


class InferenceMetrics:
    def __init__(self, models: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter(
            "phitune_inference_generated_tokens",
            "Completion tokens generated",
            ["model"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            "phitune_inference_time_to_first_token_seconds",
            "From a /generate request's arrival to its first generated text",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(AdapterCacheCollector(models))

    def generation(self, model_id: str) -> GenerationClock:
        return GenerationClock(self, model_id)


class GenerationClock:
    """One generation's observations, made from the engine's thread as its events come."""

    def __init__(self, metrics: InferenceMetrics, model_id: str) -> None:
        self.metrics, self.model_id = metrics, model_id
        self.started = time.perf_counter()
        self.first_seen = False

    def text(self) -> None:
        if not self.first_seen:
            self.first_seen = True
            self.metrics.first_token.labels(self.model_id).observe(time.perf_counter() - self.started)

    def finished(self, completion_tokens: int) -> None:
        self.metrics.tokens.labels(self.model_id).inc(completion_tokens)
