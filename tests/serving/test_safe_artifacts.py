"""Hostile adapters, built here, are refused with a clear 422 `invalid_adapter` by a real inference server
(over HTTP, fetching them from a stand-in for the API), and by a real `phitune api` in front of it: pickles,
members outside the archive, links, bombs, absurd ranks and alphas, tensors the base model has no layer for or
shaped for another rank, files safetensors cannot read. The server goes on serving good adapters."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from phitune.launch import free_port, run_phitune, running
from tests.serving.conftest import BASE_MODEL, SERVING_TOKEN, InferenceServer, generate_body, load_model
from tests.serving.stub_store import adapter_store_app, serve_in_thread
from tests.serving.test_server_auth import api_env, fine_tuned_model
from worker.adapter_archive import (
    MAX_ARCHIVE_MEMBERS,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    InvalidAdapter,
    extract_adapter,
    pack,
)
from worker.serving.lora import MultiLora, largest_adapter_bytes
from worker.tar_guard import MAX_CHAINED_HEADERS, MAX_EXTENDED_HEADER_BYTES

DOWN_A = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"


class Zeros(io.RawIOBase):
    """`size` zero bytes, read without holding them all."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def peft_archive(
    source: Path,
    archive: Path,
    *,
    config: dict | None = None,
    config_text: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    weights: bytes | None = None,
    extra: Callable[[tarfile.TarFile], None] | None = None,
) -> Path:
    """The adapter at `source`, its config updated with `config`, its tensors replaced by `tensors` or its
    weights file by `weights`, and `extra` members added last."""
    directory = archive.with_suffix("")
    shutil.copytree(source, directory)
    if config is not None:
        fields = json.loads((source / PEFT_CONFIG_FILE).read_text()) | config
        (directory / PEFT_CONFIG_FILE).write_text(json.dumps(fields))  # Infinity stays Infinity
    if config_text is not None:
        (directory / PEFT_CONFIG_FILE).write_text(config_text)
    if tensors is not None:
        save_file(tensors, directory / PEFT_WEIGHTS_FILE)
    if weights is not None:
        (directory / PEFT_WEIGHTS_FILE).write_bytes(weights)
    pack(directory, archive)
    if extra is not None:
        plain = archive.with_suffix(".plain")
        with gzip.open(archive) as packed:
            plain.write_bytes(packed.read())
        with tarfile.open(plain, "a") as tar:
            extra(tar)
        with plain.open("rb") as source_tar, gzip.open(archive, "wb", compresslevel=1) as target:
            shutil.copyfileobj(source_tar, target)
    return archive


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b"x"):
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, linkname
        if info.isreg():
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        else:
            tar.addfile(info)

    return add


def zeros(name: str, size: int):
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, io.BufferedReader(Zeros(size)))

    return add


def pax_digits(size: int = 1 << 20):
    """A member whose pax header holds `size` digits: tarfile reads it whole and parses it quadratically."""

    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("README.md")
        info.pax_headers = {"comment": "1" * size}
        tar.addfile(info, io.BytesIO())

    return add


def gnu_long_name(size: int = 1 << 20):
    """A member whose GNU long-name header holds a name of `size` bytes."""

    def add(tar: tarfile.TarFile) -> None:
        tar.format = tarfile.GNU_FORMAT
        tar.addfile(tarfile.TarInfo("n" * size), io.BytesIO())

    return add


def raw_headers(*blocks: bytes):
    """Header blocks tarfile would not write, appended as they are."""

    def add(tar: tarfile.TarFile) -> None:
        data = b"".join(blocks)
        assert tar.fileobj is not None and len(data) % tarfile.BLOCKSIZE == 0
        tar.fileobj.write(data)
        tar.offset += len(data)

    return add


def header(kind: bytes, payload: bytes = b"", name: str = "././@PaxHeader") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(payload)
    return info.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % tarfile.BLOCKSIZE)


def many_files(tar: tarfile.TarFile) -> None:
    for index in range(MAX_ARCHIVE_MEMBERS):
        member(f"notes-{index}.txt")(tar)


@pytest.fixture(scope="module")
def cap(tiny_model_dir: Path) -> int:
    """The most bytes an adapter archive of the tiny model may expand to."""
    return largest_adapter_bytes(MultiLora(load_model(tiny_model_dir)).linear_shapes)


@pytest.fixture(scope="module")
def hostile(
    adapter_dirs: dict[str, Path], cap: int, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, str, str]]:
    """adapter id → (archive, its format, what the refusal says)."""
    root = tmp_path_factory.mktemp("hostile")
    plain = adapter_dirs["ftjob-plain"]
    tensors = load_file(plain / PEFT_WEIGHTS_FILE)
    pickled = io.BytesIO()
    torch.save({"weight": torch.zeros(1)}, pickled)
    renamed = {key.replace("layers.0.", "layers.7."): value for key, value in tensors.items()}
    narrower = tensors | {DOWN_A: tensors[DOWN_A][:4]}
    as_ints = tensors | {DOWN_A: tensors[DOWN_A].to(torch.int32)}
    cases: dict[str, tuple[dict, str]] = {
        "pickle-beside": ({"extra": member("adapter_model.bin", data=pickled.getvalue())}, "pickled weights"),
        "pickle-nested": ({"extra": member("extra/optimizer.pt", data=pickled.getvalue())}, "pickled"),
        "traversal": ({"extra": member("../escaped.txt")}, "outside the archive"),
        "traversal-nested": ({"extra": member("docs/../../escaped.txt")}, "outside the archive"),
        "absolute": ({"extra": member("/tmp/phitune-escaped.txt")}, "outside the archive"),
        "symlink": ({"extra": member("README.md", tarfile.SYMTYPE, "/etc/passwd")}, "holds a link"),
        "hardlink": ({"extra": member("notes.txt", tarfile.LNKTYPE, "adapter_config.json")}, "holds a link"),
        "device": ({"extra": member("tty", tarfile.CHRTYPE)}, "not a regular file"),
        "twice": ({"extra": member(PEFT_CONFIG_FILE, data=b"{}")}, "adapter_config.json twice"),
        "bomb": ({"extra": zeros("README.md", cap + 1)}, "too large"),
        "many-files": ({"extra": many_files}, f"more than {MAX_ARCHIVE_MEMBERS} files"),
        "pax-header": ({"extra": pax_digits()}, "extended header of"),
        "gnu-long-name": ({"extra": gnu_long_name()}, "extended header of"),
        "rank-zero": ({"config": {"r": 0}}, "r=0 is not a rank"),
        "rank-absurd": ({"config": {"r": 10**9}}, "is not a rank"),
        "rank-text": ({"config": {"r": "8"}}, "is not a rank"),
        "rank-pattern-zero": ({"config": {"rank_pattern": {"down_proj": 0}}}, "is not a rank"),
        "alpha-infinite": ({"config": {"lora_alpha": float("inf")}}, "lora_alpha=inf"),
        "alpha-absurd": ({"config": {"lora_alpha": 1e300}}, "lora_alpha"),
        "pattern-regex": ({"config": {"rank_pattern": {"(a+)+$": 4}}}, "not a layer name"),
        "pattern-broken-regex": ({"config": {"alpha_pattern": {"(": 4}}}, "not a layer name"),
        "config-deep": ({"config_text": "[" * 100_000 + "]" * 100_000}, "unreadable adapter_config.json"),
        "unknown-layer": ({"tensors": renamed}, "has no linear layer model.layers.7"),
        "wrong-rank": ({"tensors": narrower}, "do not fit rank 8"),
        "int-tensor": ({"tensors": as_ints}, "not LoRA weights"),
        "not-safetensors": ({"weights": b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"}, "unreadable"),
        "huge-header": ({"weights": (10**12).to_bytes(8, "little") + b"{}"}, "unreadable"),
    }
    archives = {
        f"ftjob-{name}": (peft_archive(plain, root / f"{name}.tar.gz", **options), "peft", refusal)
        for name, (options, refusal) in cases.items()
    }
    # loralib: its config is checked before its weights are read.
    loralib = root / "loralib"
    loralib.mkdir()
    (loralib / "loralib_config.json").write_text(
        json.dumps(
            {
                "r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": 5,
                "qkv_slices": 7,
            }
        )
    )
    (loralib / "lora_state_dict.safetensors").write_bytes(b"unread")
    archives["ftjob-loralib-config"] = (pack(loralib, root / "loralib.tar.gz"), "loralib", "list of names")
    archives["ftjob-good"] = (pack(plain, root / "good.tar.gz"), "peft", "")
    return archives


CHAIN = [header(tarfile.XHDTYPE, b"17 comment=chain\n")] * (MAX_CHAINED_HEADERS + 1)
SPARSE_1_0 = b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n"
HOSTILE_HEADERS = {
    "pax-digits": (pax_digits(), f"more than the {MAX_EXTENDED_HEADER_BYTES} one may have"),
    "global-digits": (raw_headers(header(tarfile.XGLTYPE, b"1" * (1 << 20))), "extended header of"),
    "gnu-long-name": (gnu_long_name(), "extended header of"),
    "gnu-long-link": (raw_headers(header(tarfile.GNUTYPE_LONGLINK, b"l" * (1 << 20))), "extended header of"),
    "many-pax-headers": (lambda tar: [pax_digits(8000)(tar) for _ in range(20)], "bytes of extended headers"),
    "chained": (raw_headers(*CHAIN), f"more than {MAX_CHAINED_HEADERS} extended headers in a row"),
    "sparse-pax": (
        raw_headers(header(tarfile.XHDTYPE, SPARSE_1_0), header(tarfile.REGTYPE, name="x")),
        "sparse",
    ),
    "bad-hdrcharset": (
        raw_headers(header(tarfile.XHDTYPE, b"20 hdrcharset=\xff\xff\xff\n")),
        "not a readable",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_HEADERS)
def test_an_oversized_or_malformed_tar_header_is_refused_before_it_is_read(
    adapter_dirs: dict[str, Path], tmp_path: Path, case: str
) -> None:
    """A few hundred bytes of gzip holding a header tarfile would read whole (and parse in quadratic time)
    before any member check: refused at once, with the archive's clean error, and nothing left."""
    extra, refusal = HOSTILE_HEADERS[case]
    archive = peft_archive(adapter_dirs["ftjob-plain"], tmp_path / "hostile.tar.gz", extra=extra)
    destination = tmp_path / "adapter"
    started = time.monotonic()
    with pytest.raises(InvalidAdapter, match=refusal):
        extract_adapter(archive, destination)
    assert time.monotonic() - started < 2
    assert not destination.exists()


def test_an_archive_with_long_member_names_still_extracts(
    adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Names past ustar's 100 bytes (pax headers, and GNU long names) are read as before."""

    def long_names(tar: tarfile.TarFile) -> None:
        member("docs/" + "n" * 300 + ".txt")(tar)
        tar.format = tarfile.GNU_FORMAT
        member("docs/" + "g" * 300 + ".txt")(tar)

    archive = peft_archive(adapter_dirs["ftjob-plain"], tmp_path / "long.tar.gz", extra=long_names)
    with gzip.open(archive) as plain:
        headers = [block[156:157] for block in iter(lambda: plain.read(tarfile.BLOCKSIZE), b"")]
    assert tarfile.XHDTYPE in headers and tarfile.GNUTYPE_LONGNAME in headers
    extracted = extract_adapter(archive, tmp_path / "adapter")
    assert sorted(path.name for path in extracted.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]


@pytest.fixture(scope="module")
def store(hostile: dict[str, tuple[Path, str, str]]) -> Iterator[str]:
    archives = {adapter_id: archive for adapter_id, (archive, _, _) in hostile.items()}
    formats = {adapter_id: fmt for adapter_id, (_, fmt, _) in hostile.items()}
    with serve_in_thread(adapter_store_app(archives, SERVING_TOKEN, formats)) as url:
        yield url


@pytest.fixture(scope="module")
def inference(start_server: Callable[..., InferenceServer], store: str) -> InferenceServer:
    return start_server(8, store)


CASES = [
    "pickle-beside", "pickle-nested", "traversal", "traversal-nested", "absolute", "symlink", "hardlink",
    "device", "twice", "bomb", "many-files", "pax-header", "gnu-long-name", "rank-zero", "rank-absurd",
    "rank-text", "rank-pattern-zero",
    "alpha-infinite", "alpha-absurd", "pattern-regex", "pattern-broken-regex", "config-deep", "unknown-layer",
    "wrong-rank", "int-tensor", "not-safetensors", "huge-header", "loralib-config",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_adapter_is_refused_with_a_clear_error(
    inference: InferenceServer, hostile: dict[str, tuple[Path, str, str]], case: str, tmp_path: Path
) -> None:
    adapter_id = f"ftjob-{case}"
    with inference.client() as client:
        response = client.post("/generate", json=generate_body(adapter_id, "Hi", max_tokens=2))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_adapter" and error["param"] == "model"
    assert hostile[adapter_id][2] in error["message"]
    assert adapter_id not in inference.stats()["loaded_adapters"]
    assert not Path("/tmp/phitune-escaped.txt").exists()


def test_the_server_still_serves_good_adapters_and_leaves_no_files(inference: InferenceServer) -> None:
    with inference.client() as client:
        for adapter_id in ("ftjob-rank-zero", "ftjob-good", "ftjob-bomb", None):
            response = client.post("/generate", json=generate_body(adapter_id, "Hi", max_tokens=2))
            assert response.status_code == (422 if adapter_id and adapter_id != "ftjob-good" else 200)
    data_dir = inference.app.state.models[BASE_MODEL].adapters._directory
    assert not [path for path in data_dir.rglob("*") if path.is_file()]  # nothing extracted is left


@pytest.fixture(scope="module")
def api(
    start_server: Callable[..., InferenceServer],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    """A `phitune api` process and an inference server fetching adapters from it: a client of the API and a
    tenant's Authorization header."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    inference = start_server(8, api_url)
    env = api_env(tmp_path_factory.mktemp("api-data"), tiny_model_dir, inference.url)
    run_phitune("migrate", env=env)
    key = run_phitune("keys", "create", "--tenant", "hostile", env=env).strip().splitlines()[-1]
    with (
        running(["api", "--port", str(port)], api_url, env=env),
        httpx.Client(base_url=api_url, timeout=120) as c,
    ):
        yield c, {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("case", ["rank-zero", "not-safetensors", "traversal"])
def test_the_api_answers_a_chat_with_a_hostile_adapter_with_the_refusal(
    api: tuple[httpx.Client, dict[str, str]], hostile: dict[str, tuple[Path, str, str]], case: str
) -> None:
    client, auth = api
    archive, _, refusal = hostile[f"ftjob-{case}"]
    _, model = fine_tuned_model(client, auth, archive)
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for stream in (False, True):
        answer = client.post("/v1/chat/completions", json=chat | {"stream": stream}, headers=auth)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "invalid_adapter" and refusal in error["message"]
