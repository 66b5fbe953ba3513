"""Safe extraction of an adapter archive: a .tar.gz with its files at the root (`worker.tasks.pack`).

Only the files that serving needs are extracted, as plain files at the top of the destination. An archive
that carries pickled weights anywhere is refused outright: unpickling runs code; adapters are safetensors.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from worker.serving.lora import CONFIG_FILE, WEIGHTS_FILE, InvalidAdapter

SERVED_FILES = {CONFIG_FILE, WEIGHTS_FILE}  # a PEFT adapter's
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
MAX_ADAPTER_BYTES = 8 * 1024**3  # far above any LoRA of a model this server can hold


def extract_adapter(archive: Path, destination: Path, files: set[str] = SERVED_FILES) -> Path:
    """Extract the adapter `files` (config and safetensors weights) of `archive` into `destination`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                if PurePosixPath(member.name).suffix.lower() in PICKLE_SUFFIXES:
                    raise InvalidAdapter(
                        f"the adapter archive holds pickled weights ({member.name}); refused"
                    )
            served = {_root_name(member): member for member in members if _root_name(member) in files}
            missing = files - served.keys()
            if missing:
                raise InvalidAdapter(f"the adapter archive lacks {', '.join(sorted(missing))}")
            if any(not member.isfile() for member in served.values()):
                raise InvalidAdapter("the adapter archive's files must be regular files")
            if sum(member.size for member in served.values()) > MAX_ADAPTER_BYTES:
                raise InvalidAdapter("the adapter archive is too large")
            destination.mkdir(parents=True, exist_ok=True)
            for name, member in served.items():
                member.name = name  # "./adapter_config.json" lands as destination/adapter_config.json
                tar.extract(member, destination, filter="data")
    except tarfile.TarError as exc:
        raise InvalidAdapter(f"the adapter archive is not a readable tar file: {exc}") from exc
    return destination


def _root_name(member: tarfile.TarInfo) -> str | None:
    """The member's file name when it sits at the archive's root, else None."""
    parts = [part for part in PurePosixPath(member.name).parts if part != "."]
    return parts[0] if len(parts) == 1 else None
