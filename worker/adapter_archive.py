"""The adapter archive format, in one place for the worker that packs archives and the server that reads them.

An adapter directory holds the PEFT files at its root (or PEFT_UNAVAILABLE.txt saying why there are none) and
the loralib files in `loralib/`. Each format travels as a .tar.gz of its directory's files at the root
(`pack`); the API stores and serves it as it is, naming its format in a header (`app.adapter_format`).
Reading extracts only the files serving needs, as plain files, and refuses an archive that carries pickled
weights anywhere: unpickling runs code; adapters are safetensors. Torch-free, so packing needs no model.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

from app.adapter_format import FORMATS, Format

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
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


def extract_adapter(archive: Path, destination: Path, fmt: str = "peft") -> Path:
    """Extract the files serving reads (config and safetensors weights) from an archive in format `fmt`
    (as the API's header names it) into `destination`."""
    files = SERVED_FILES[served_format(fmt)]
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                if PurePosixPath(member.name).suffix.lower() in PICKLE_SUFFIXES:
                    raise InvalidAdapter(
                        f"the adapter archive holds pickled weights ({member.name}); refused"
                    )
            served = {
                name: member
                for member in members
                if (name := _root_name(member)) is not None and name in files
            }
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


def served_format(name: str) -> Format:
    """The format an archive's header names, or InvalidAdapter when serving knows no such format."""
    for fmt in FORMATS:
        if name == fmt:
            return fmt
    raise InvalidAdapter(f"unsupported adapter format {name!r}")


def _root_name(member: tarfile.TarInfo) -> str | None:
    """The member's file name when it sits at the archive's root, else None."""
    parts = [part for part in PurePosixPath(member.name).parts if part != "."]
    return parts[0] if len(parts) == 1 else None
