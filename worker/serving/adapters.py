"""The adapters an engine has loaded: fetched through the API on first use, kept by recency (LRU).

Loading runs on loader threads: download, extraction and the safetensors read never hold up the engine, which
only copies the ready weights into the model between two decode steps. A request holds a lease on its adapter
while it generates; an adapter with leases is never evicted, so the cache can exceed its capacity until they
end. Extracted files live only while an adapter loads.

Behind the loaded adapters, a second tier keeps the weights read (on the host, pinned when the engine is on a
GPU) of the most recently used adapters, up to `host_bytes`: reloading one of them skips the download, the
extraction and the read, and needs no loader thread, only the copy into the model between two steps. With
more adapters in flight than the engine keeps loaded, every request would otherwise fetch its adapter again.
A deleted model leaves both tiers (`evict`, called by the API when it deletes it, and when a resumed attempt
replaces a checkpoint's adapter), so it is never served from a stale copy; without the second tier
(`host_bytes=0`) a reload fetches again.

Every archive is checked before anything in it is read (`worker.adapter_archive`), against a cap on its
decompressed size from the base model's layers (`lora.largest_adapter_bytes`), and every adapter's config
and tensors against the base model (`worker.serving.lora`): a hostile adapter is an InvalidAdapter.

The API says which format it sends (`X-Phitune-Adapter-Format`): PEFT, or loralib where the adapter has no
exact PEFT form. Both are read into the same per-row LoRA form (`worker.serving.lora`,
`worker.serving.loralib_adapter`).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from app.adapter_format import FORMAT_HEADER, Format
from app.service_auth import bearer
from worker.adapter_archive import extract_adapter, served_format
from worker.serving.engine import Engine
from worker.serving.lora import AdapterWeights, LoraModule, largest_adapter_bytes, read_adapter
from worker.serving.loralib_adapter import read_loralib_adapter

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # also a safe directory name

# (adapter_id, destination): writes the adapter's .tar.gz and returns its format, None meaning PEFT.
AdapterFetcher = Callable[[str, Path], str | None]
AdapterReader = Callable[[Path, dict[str, tuple[int, int]], torch.device], AdapterWeights]
READERS: dict[Format, AdapterReader] = {"peft": read_adapter, "loralib": read_loralib_adapter}


class AdapterNotFound(LookupError):
    """No such adapter: unknown, or deleted."""


class AdapterFetchFailed(RuntimeError):
    """The adapter could not be downloaded (the API is unreachable or failed)."""


class HttpAdapterFetcher:
    """Downloads adapters from the API's internal route, authenticated by the serving token (which opens
    nothing else)."""

    def __init__(self, api_url: str, serving_token: str, *, timeout: float = 300.0) -> None:
        # One client for all downloads: making one costs ~20 ms (its SSL context), a tenth of a cold start.
        self._http = httpx.Client(
            base_url=api_url.rstrip("/") + "/internal/v1/adapters/",
            headers=bearer(serving_token),
            timeout=timeout,
        )

    def __call__(self, adapter_id: str, destination: Path) -> str | None:
        try:
            with self._http.stream("GET", adapter_id) as response:
                if response.status_code == 404:
                    raise AdapterNotFound(adapter_id)
                if response.status_code != 200:
                    status = response.status_code
                    raise AdapterFetchFailed(f"the API answered {status} for adapter {adapter_id}")
                with destination.open("wb") as file:
                    for chunk in response.iter_bytes():
                        file.write(chunk)
                return response.headers.get(FORMAT_HEADER)
        except httpx.HTTPError as exc:
            raise AdapterFetchFailed(f"could not download adapter {adapter_id}: {exc}") from exc

    def close(self) -> None:
        self._http.close()


@dataclass(eq=False)
class _Entry:
    adapter_id: str
    loaded: Future[int]  # the engine slot, once loaded
    leases: int = 0
    retired: bool = False  # evicted by DELETE while leased: unloaded when the last lease ends

    @property
    def ready(self) -> bool:
        return self.loaded.done() and self.loaded.exception() is None


class AdapterLease:
    """A request's hold on a loaded adapter; release it when the request ends."""

    def __init__(self, cache: AdapterCache, entry: _Entry) -> None:
        self.adapter_id = entry.adapter_id
        self.slot = entry.loaded.result()
        self._cache = cache
        self._entry: _Entry | None = entry

    def release(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._cache._release(entry)


class AdapterCache:
    """The most recently used `capacity` adapters of one engine, loaded on demand by `fetch`, and the weights
    of the most recently used ones that fit in `host_bytes` kept on the host for a fast reload."""

    def __init__(
        self,
        engine: Engine,
        fetch: AdapterFetcher,
        directory: Path,
        *,
        capacity: int,
        loaders: int = 2,
        host_bytes: int = 0,
    ) -> None:
        self.capacity = capacity
        self.host_bytes = host_bytes
        self._engine = engine
        self._fetch = fetch
        self._directory = directory
        self._max_archive_bytes = largest_adapter_bytes(engine.lora.linear_shapes)  # decompressed
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._host: OrderedDict[str, tuple[AdapterWeights, int]] = OrderedDict()  # weights, bytes; LRU first
        self._host_used = 0
        self._lock = threading.Lock()
        self._loaders = ThreadPoolExecutor(loaders, thread_name_prefix="adapter-loader")
        self.counters = {"adapter_downloads": 0, "adapter_host_hits": 0}  # loads from each source
        self.hits = 0  # leases of an adapter already loaded (or loading)
        self.evictions = 0  # adapters unloaded to make room

    def acquire(self, adapter_id: str) -> Future[AdapterLease]:
        """A lease on the adapter, loading it first if needed. Fails with AdapterNotFound, InvalidAdapter
        or AdapterFetchFailed. Cancelling the future gives up the lease."""
        leased: Future[AdapterLease] = Future()
        if not ADAPTER_ID.fullmatch(adapter_id):
            leased.set_exception(AdapterNotFound(adapter_id))
            return leased
        kept: AdapterWeights | None = None
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                entry = self._entries[adapter_id] = _Entry(adapter_id, Future())
                if adapter_id in self._host:  # no loader thread: only the copy into the model is left
                    self._host.move_to_end(adapter_id)
                    kept = self._host[adapter_id][0]
                    self.counters["adapter_host_hits"] += 1
                    self._trim(self.capacity - 1)
                else:
                    self.counters["adapter_downloads"] += 1
                    self._loaders.submit(self._load, entry)
            else:
                self.hits += 1
            self._entries.move_to_end(adapter_id)
            entry.leases += 1
        if kept is not None:
            self._install(entry, kept)
        entry.loaded.add_done_callback(lambda _: self._hand_over(entry, leased))
        return leased

    def evict(self, adapter_id: str) -> bool:
        """Unload an adapter now, or when its last lease ends, and forget its weights kept on the host; False
        if it was in neither tier."""
        with self._lock:
            kept = self._forget_host(adapter_id)
            entry = self._entries.pop(adapter_id, None)
            if entry is None:
                return kept
            entry.retired = True
            if entry.leases == 0 and entry.ready:
                self._engine.remove_adapter(entry.loaded.result())
        return True

    def loaded(self) -> list[str]:
        """The ids of the loaded adapters, least recently used first."""
        with self._lock:
            return [adapter_id for adapter_id, entry in self._entries.items() if entry.ready]

    def close(self) -> None:
        self._loaders.shutdown(wait=True, cancel_futures=True)

    def _hand_over(self, entry: _Entry, leased: Future[AdapterLease]) -> None:
        if not leased.set_running_or_notify_cancel():  # the requester gave up while the adapter loaded
            self._release(entry)
        elif entry.loaded.exception() is not None:
            self._release(entry)
            leased.set_exception(entry.loaded.exception())
        else:
            leased.set_result(AdapterLease(self, entry))

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.leases -= 1
            if entry.retired and entry.leases == 0 and entry.ready:
                self._engine.remove_adapter(entry.loaded.result())
            self._trim(self.capacity)

    def _load(self, entry: _Entry) -> None:
        try:
            adapter = self._download(entry.adapter_id)
            with self._lock:
                if self._entries.get(entry.adapter_id) is entry:  # not deleted while it downloaded
                    self._keep_on_host(entry.adapter_id, adapter)
                self._trim(self.capacity - 1)  # make room before the new adapter takes memory
        except BaseException as exc:
            self._failed(entry, exc)
            return
        self._install(entry, adapter)

    def _install(self, entry: _Entry, adapter: AdapterWeights) -> None:
        """Have the engine copy `adapter` in between two steps; `entry` is loaded once it has."""
        try:
            installed = self._engine.install_adapter(adapter)
        except BaseException as exc:  # the engine is stopped
            self._failed(entry, exc)
            return

        def done(_: Future[int]) -> None:
            exc = installed.exception()
            if exc is not None:
                self._failed(entry, exc)
            else:
                entry.loaded.set_result(installed.result())

        installed.add_done_callback(done)

    def _failed(self, entry: _Entry, exc: BaseException) -> None:
        with self._lock:
            if self._entries.get(entry.adapter_id) is entry:
                del self._entries[entry.adapter_id]
            self._forget_host(entry.adapter_id)
        entry.loaded.set_exception(exc)

    def _keep_on_host(self, adapter_id: str, adapter: AdapterWeights) -> None:
        """Keep `adapter`'s weights for a reload, dropping the least recently used over budget (lock held)."""
        size = sum(m.a.nbytes + m.b.nbytes for m in adapter.modules.values())
        self._forget_host(adapter_id)
        if size > self.host_bytes:
            return
        while self._host and self._host_used + size > self.host_bytes:
            self._forget_host(next(iter(self._host)))
        self._host[adapter_id] = (adapter, size)
        self._host_used += size

    def _forget_host(self, adapter_id: str) -> bool:
        kept = self._host.pop(adapter_id, None)
        if kept is not None:
            self._host_used -= kept[1]
        return kept is not None

    def _download(self, adapter_id: str) -> AdapterWeights:
        """Fetch, extract and read an adapter; its files are gone again afterwards. Read onto the host when
        the second tier keeps it (pinned for a GPU), else onto the engine's device."""
        # A directory of its own per load: an evicted adapter may still be loading when it is asked for again.
        work_dir = self._directory / adapter_id / secrets.token_hex(8)
        work_dir.mkdir(parents=True)
        try:
            archive = work_dir / "adapter.tar.gz"
            adapter_format = served_format(self._fetch(adapter_id, archive) or "peft")  # refuses unknown ones
            files = extract_adapter(
                archive, work_dir / "files", adapter_format, max_bytes=self._max_archive_bytes
            )
            read = READERS[adapter_format]
            device = self._engine.model.device
            if self.host_bytes == 0:
                return read(files, self._engine.lora.linear_shapes, device)
            adapter = read(files, self._engine.lora.linear_shapes, torch.device("cpu"))
            if device.type != "cuda":
                return adapter
            return AdapterWeights(
                {
                    name: LoraModule(m.a.pin_memory(), m.b.pin_memory(), m.scaling)
                    for name, m in adapter.modules.items()
                }
            )
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # another load of this adapter may still use it
                work_dir.parent.rmdir()

    def _trim(self, capacity: int) -> None:
        """Evict least recently used, unleased adapters until at most `capacity` are loaded (lock held)."""
        ready = [entry for entry in self._entries.values() if entry.ready]
        excess = len(ready) - capacity
        for entry in ready:
            if excess <= 0:
                return
            if entry.leases == 0:
                del self._entries[entry.adapter_id]
                self._engine.remove_adapter(entry.loaded.result())
                self.evictions += 1
                excess -= 1
