"""The adapter archive format, in one place for the worker that packs archives and the server that reads them.

An adapter directory holds the PEFT files at its root (or PEFT_UNAVAILABLE.txt saying why there are none) and
the loralib files in `loralib/`. Each format travels as a .tar.gz of its directory's files at the root
(`pack`); the API stores and serves it as it is, naming its format in a header (`app.adapter_format`).
Reading extracts only the files serving needs, as plain files, and refuses an archive that carries pickled
weights anywhere (unpickling runs code; adapters are safetensors), a member whose name leaves the archive
(absolute, `..`), a link or a device, or more bytes once decompressed than any adapter of the base model
can take (a gzip of zeros expands a thousandfold). Torch-free, so packing needs no model.
"""

from __future__ import annotations

import gzip
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Protocol, cast

from app.adapter_format import FORMATS, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, Format
from worker.tar_guard import GuardedTarFile, UnsafeTarHeader

PEFT_UNAVAILABLE_FILE = "PEFT_UNAVAILABLE.txt"  # at the root instead of the PEFT files: why there are none
LORALIB_DIR = "loralib"
LORALIB_CONFIG_FILE = "loralib_config.json"
LORALIB_STATE_DICT_FILE = "lora_state_dict.safetensors"
# The files serving extracts from each format's archive (which also holds a README.md).
SERVED_FILES: dict[Format, set[str]] = {
    "peft": {PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE},
    "loralib": {LORALIB_CONFIG_FILE, LORALIB_STATE_DICT_FILE},
}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
MAX_ADAPTER_BYTES = 8 * 1024**3  # far above any LoRA of a model the inference server can hold
MAX_ARCHIVE_MEMBERS = 64  # a packed format holds a handful of files
_GZIP_MAGIC = b"\x1f\x8b"
_READ_BYTES = 1 << 20
_TAR_OVERHEAD_BYTES = 1 << 20  # headers, padding and end-of-archive blocks, beyond the files' own bytes


class InvalidAdapter(ValueError):
    """The adapter cannot be served over this base model: an unsafe or incomplete archive, not plain LoRA,
    or shapes that do not fit."""


def adapter_formats(adapter_dir: Path) -> dict[Format, Path]:
    """The download formats an adapter directory holds: PEFT files at its root, loralib in `loralib/`."""
    formats: dict[Format, Path] = {}
    if (adapter_dir / PEFT_CONFIG_FILE).exists():
        formats["peft"] = adapter_dir
    if (adapter_dir / LORALIB_DIR).is_dir():
        formats["loralib"] = adapter_dir / LORALIB_DIR
    return formats


def pack(directory: Path, archive: Path) -> Path:
    """A .tar.gz of a directory's files at its root (no sub-folders)."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.name != PEFT_UNAVAILABLE_FILE:
                tar.add(path, arcname=path.name)
    return archive


def extract_adapter(
    archive: Path, destination: Path, fmt: str = "peft", *, max_bytes: int = MAX_ADAPTER_BYTES
) -> Path:
    """Extract the files serving reads (config and safetensors weights) from an archive in format `fmt`
    (as the API's header names it) into `destination`; InvalidAdapter, and nothing left in `destination`,
    when the archive is unsafe (see the module's docstring) or more than `max_bytes` once decompressed.

    The archive is read as a stream and each member checked before its data is read: the decompressed bytes
    are counted as they come, so a bomb is stopped at `max_bytes`, whatever its headers declare."""
    files = SERVED_FILES[served_format(fmt)]
    extracted: set[str] = set()
    created = not destination.exists()
    try:
        with (
            archive.open("rb") as raw,
            GuardedTarFile.open(fileobj=_decompressed(raw, max_bytes), mode="r|") as tar,
        ):
            declared = 0
            for count, member in enumerate(tar, start=1):
                declared += member.size
                _check_member(member, count, declared, max_bytes)
                name = _root_name(member)
                if name not in files:
                    continue  # a README.md, or a directory entry: never extracted
                if name in extracted:
                    raise InvalidAdapter(f"the adapter archive holds {name} twice")
                if not member.isfile():
                    raise InvalidAdapter("the adapter archive's files must be regular files")
                destination.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file's
                with (destination / name).open("wb") as target:
                    shutil.copyfileobj(source, target)
                extracted.add(name)
        if missing := files - extracted:
            raise InvalidAdapter(f"the adapter archive lacks {', '.join(sorted(missing))}")
    except UnsafeTarHeader as exc:
        _discard(destination, created, extracted)
        raise InvalidAdapter(f"the adapter archive {exc}") from exc
    except InvalidAdapter:
        _discard(destination, created, extracted)
        raise
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error, ValueError) as exc:
        # ValueError: tarfile's parsing of a malformed pax header (a hdrcharset or sparse size not UTF-8 or
        # not a number)
        _discard(destination, created, extracted)
        raise InvalidAdapter(f"the adapter archive is not a readable tar file: {exc}") from exc
    except BaseException:
        _discard(destination, created, extracted)
        raise
    return destination


def served_format(name: str) -> Format:
    """The format an archive's header names, or InvalidAdapter when serving knows no such format."""
    for fmt in FORMATS:
        if name == fmt:
            return fmt
    raise InvalidAdapter(f"unsupported adapter format {name!r}")


def _check_member(member: tarfile.TarInfo, count: int, declared: int, max_bytes: int) -> None:
    """Refuse a member that must not be in an adapter archive, before its data is read."""
    path = PurePosixPath(member.name)
    if count > MAX_ARCHIVE_MEMBERS:
        raise InvalidAdapter(f"the adapter archive holds more than {MAX_ARCHIVE_MEMBERS} files")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidAdapter(f"the adapter archive holds pickled weights ({member.name}); refused")
    if path.is_absolute() or ".." in path.parts:
        raise InvalidAdapter(f"the adapter archive holds a path outside the archive ({member.name}); refused")
    if member.issym() or member.islnk():
        raise InvalidAdapter(
            f"the adapter archive holds a link ({member.name} -> {member.linkname}); "
            "the adapter archive's files must be regular files"
        )
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise InvalidAdapter(f"the adapter archive holds {member.name}, which is not a regular file")
    if declared > max_bytes:
        raise InvalidAdapter(_too_large(max_bytes))


def _too_large(max_bytes: int) -> str:
    return f"the adapter archive is too large: more than {max_bytes} bytes once decompressed"


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Capped:
    """A stream's `read`, refusing to give more than `limit` bytes in all: InvalidAdapter(`refusal`)."""

    def __init__(self, source: _Readable, limit: int, refusal: str) -> None:
        self._source = source
        self._left = limit
        self._refusal = refusal

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(_READ_BYTES if size < 0 else min(size, _READ_BYTES))
        self._left -= len(data)
        if self._left < 0:
            raise InvalidAdapter(self._refusal)
        return data


def _decompressed(raw: BinaryIO, max_bytes: int) -> IO[bytes]:
    """The archive's tar stream, gunzipped when it is a gzip, capped at `max_bytes` (with the headers'
    blocks and the end-of-archive padding on top)."""
    compressed = raw.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    raw.seek(0)
    stream: _Readable = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
    capped = _Capped(stream, max_bytes + _TAR_OVERHEAD_BYTES, _too_large(max_bytes))
    return cast(IO[bytes], capped)  # as a stream ("r|"), tarfile only reads it


def _discard(destination: Path, created: bool, extracted: set[str]) -> None:
    """Leave nothing of a refused archive: the files extracted, and `destination` when this made it."""
    if created:
        shutil.rmtree(destination, ignore_errors=True)
    else:
        for name in extracted:
            (destination / name).unlink(missing_ok=True)


def _root_name(member: tarfile.TarInfo) -> str | None:
    """The member's file name when it sits at the archive's root, else None."""
    parts = [part for part in PurePosixPath(member.name).parts if part != "."]
    return parts[0] if len(parts) == 1 else None
