"""Adapters: fetched over real HTTP, extracted safely, kept by recency, loaded without stalling generation."""

from __future__ import annotations

import io
import queue
import shutil
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from phitune.launch import free_port
from tests.serving.conftest import ADAPTERS, PICKLED_ADAPTER, SERVING_TOKEN, load_model
from worker.adapter_archive import SERVED_FILES, InvalidAdapter, extract_adapter
from worker.serving.adapters import AdapterCache, AdapterFetchFailed, AdapterNotFound, HttpAdapterFetcher
from worker.serving.engine import Engine, Finished, GenerationRequest


def test_the_http_fetcher_downloads_the_archive(
    store_url: str, archives: dict[str, Path], tmp_path: Path
) -> None:
    with closing(HttpAdapterFetcher(store_url, SERVING_TOKEN)) as fetch:
        fetch("ftjob-plain", tmp_path / "adapter.tar.gz")
    assert (tmp_path / "adapter.tar.gz").read_bytes() == archives["ftjob-plain"].read_bytes()


def test_the_http_fetcher_tells_unknown_from_unavailable(store_url: str, tmp_path: Path) -> None:
    nobody_listens = f"http://127.0.0.1:{free_port()}"
    with (
        closing(HttpAdapterFetcher(store_url, SERVING_TOKEN)) as fetch,
        closing(HttpAdapterFetcher(store_url, "wrong-token")) as fetch_with_a_wrong_token,
        closing(HttpAdapterFetcher(nobody_listens, SERVING_TOKEN)) as fetch_from_nowhere,
    ):
        with pytest.raises(AdapterNotFound):
            fetch("ftjob-deleted", tmp_path / "a.tar.gz")
        with pytest.raises(AdapterFetchFailed, match="401"):
            fetch_with_a_wrong_token("ftjob-plain", tmp_path / "b.tar.gz")
        with pytest.raises(AdapterFetchFailed):
            fetch_from_nowhere("ftjob-plain", tmp_path / "c.tar.gz")


def test_pickled_weights_are_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapter, match="pickled"):
        extract_adapter(archives[PICKLED_ADAPTER], tmp_path / "files")
    assert not (tmp_path / "files").exists()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def test_only_the_served_files_are_extracted(adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in SERVED_FILES["peft"]:
            tar.add(adapter_dirs["ftjob-plain"] / name, arcname=f"./{name}")
        add_file(tar, "nested/adapter_config.json", b"{}")
    files = extract_adapter(archive, tmp_path / "extract" / "files")
    assert {path.name for path in files.iterdir()} == SERVED_FILES["peft"]
    assert [path.name for path in (tmp_path / "extract").iterdir()] == ["files"]


def test_a_link_in_place_of_the_weights_is_refused(adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(adapter_dirs["ftjob-plain"] / "adapter_config.json", arcname="adapter_config.json")
        link = tarfile.TarInfo("adapter_model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(InvalidAdapter, match="regular files"):
        extract_adapter(archive, tmp_path / "files")


class CountingFetcher:
    """Copies archives like the HTTP fetcher would download them, counting fetches; `gate` can hold them."""

    def __init__(self, archives: dict[str, Path]) -> None:
        self.archives = archives
        self.fetches: Counter[str] = Counter()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, adapter_id: str, destination: Path) -> None:
        self.gate.wait(timeout=30)
        self.fetches[adapter_id] += 1
        if adapter_id not in self.archives:
            raise AdapterNotFound(adapter_id)
        shutil.copyfile(self.archives[adapter_id], destination)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> Iterator[Engine]:
    engine = Engine(load_model(tiny_model_dir), tokenizer)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def fetcher(archives: dict[str, Path]) -> CountingFetcher:
    return CountingFetcher(archives)


@pytest.fixture
def cache(engine: Engine, fetcher: CountingFetcher, tmp_path: Path) -> Iterator[AdapterCache]:
    cache = AdapterCache(engine, fetcher, tmp_path / "adapters", capacity=2)
    yield cache
    cache.close()
    assert not list((tmp_path / "adapters").iterdir())  # the extracted files are gone once loaded


def use(cache: AdapterCache, adapter_id: str) -> int:
    lease = cache.acquire(adapter_id).result(timeout=30)
    lease.release()
    return lease.slot


def test_the_least_recently_used_adapter_is_evicted(cache: AdapterCache, fetcher: CountingFetcher) -> None:
    first, second, third = ADAPTERS
    use(cache, first)
    use(cache, second)
    use(cache, first)
    assert cache.loaded() == [second, first]
    use(cache, third)
    assert cache.loaded() == [first, third]
    use(cache, second)  # evicted earlier: fetched again
    assert fetcher.fetches == {first: 1, second: 2, third: 1}


def test_a_leased_adapter_is_not_evicted(cache: AdapterCache) -> None:
    first, second, third = ADAPTERS
    lease = cache.acquire(first).result(timeout=30)
    use(cache, second)
    use(cache, third)
    assert cache.loaded() == [first, third]
    lease.release()


def test_concurrent_requests_for_a_cold_adapter_fetch_it_once(
    cache: AdapterCache, fetcher: CountingFetcher
) -> None:
    fetcher.gate.clear()
    futures = [cache.acquire("ftjob-plain") for _ in range(3)]
    fetcher.gate.set()
    leases = [future.result(timeout=30) for future in futures]
    assert len({lease.slot for lease in leases}) == 1
    assert fetcher.fetches == {"ftjob-plain": 1}
    for lease in leases:
        lease.release()


def test_loading_an_adapter_does_not_hold_up_generation(
    cache: AdapterCache, fetcher: CountingFetcher, engine: Engine
) -> None:
    fetcher.gate.clear()  # the download hangs until the generation below is done
    loading = cache.acquire("ftjob-plain")
    events: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(GenerationRequest(prompt_ids=[2, 203, 815, 4, 203, 3, 203], max_tokens=20), events.put)
    while not isinstance(events.get(timeout=30), Finished):
        pass
    assert not loading.done()
    fetcher.gate.set()
    loading.result(timeout=30).release()


def test_failed_loads_are_not_cached(cache: AdapterCache, fetcher: CountingFetcher) -> None:
    for _ in range(2):
        with pytest.raises(InvalidAdapter):
            cache.acquire(PICKLED_ADAPTER).result(timeout=30)
        with pytest.raises(AdapterNotFound):
            cache.acquire("ftjob-unknown").result(timeout=30)
    assert fetcher.fetches == {PICKLED_ADAPTER: 2, "ftjob-unknown": 2}
    assert cache.loaded() == []


def test_an_adapter_evicted_while_leased_is_unloaded_when_released(cache: AdapterCache) -> None:
    lease = cache.acquire("ftjob-plain").result(timeout=30)
    assert cache.evict("ftjob-plain")
    assert cache.loaded() == []
    assert not cache.evict("ftjob-plain")
    slot = lease.slot
    lease.release()
    assert use(cache, "ftjob-attention") == slot  # the slot was freed for the next adapter


@pytest.fixture
def host_cache(engine: Engine, fetcher: CountingFetcher, tmp_path: Path) -> Iterator[AdapterCache]:
    cache = AdapterCache(engine, fetcher, tmp_path / "adapters", capacity=2, host_bytes=2**30)
    yield cache
    cache.close()


def test_an_evicted_adapter_kept_on_the_host_is_reloaded_without_a_fetch(
    host_cache: AdapterCache, fetcher: CountingFetcher
) -> None:
    first, second, third = ADAPTERS
    for adapter_id in (first, second, third, first):
        use(host_cache, adapter_id)
    assert host_cache.loaded() == [third, first]
    assert fetcher.fetches == {first: 1, second: 1, third: 1}
    assert host_cache.counters == {"adapter_downloads": 3, "adapter_host_hits": 1}


def test_a_deleted_adapter_leaves_the_host_tier_too(
    host_cache: AdapterCache, fetcher: CountingFetcher
) -> None:
    first, second, third = ADAPTERS
    for adapter_id in (first, second, third):
        use(host_cache, adapter_id)
    assert host_cache.evict(first)  # no longer loaded, but kept on the host
    assert not host_cache.evict(first)
    use(host_cache, first)
    assert fetcher.fetches[first] == 2


def test_the_host_tier_keeps_what_fits_in_its_budget(
    engine: Engine, fetcher: CountingFetcher, tmp_path: Path
) -> None:
    cache = AdapterCache(engine, fetcher, tmp_path / "adapters", capacity=1, host_bytes=1)
    try:
        first, second, _ = ADAPTERS
        for adapter_id in (first, second, first):
            use(cache, adapter_id)
        assert fetcher.fetches == {first: 2, second: 1}  # larger than the budget: not kept
    finally:
        cache.close()
