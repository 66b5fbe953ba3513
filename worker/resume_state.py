"""Resume states: an attempt's whole training state, packed so that a later attempt continues exactly.

A state directory holds TRAINER_DIR, the trainer's own checkpoint, which
`Trainer.train(resume_from_checkpoint=…)` reads: the LoRA weights, `optimizer.pt`, `scheduler.pt`,
`scaler.pt` (mixed precision), `rng_state.pth` (python, numpy, torch, CUDA) and `trainer_state.json` (global
step, epoch, tokens seen, log history). Beside it are MANIFEST_FILE (format version, step, fingerprint, the
recipe's own progress) and, with load_best_model_at_end, BEST_DIR: the adapter of the best checkpoint so far.
The archive is an uncompressed tar (the weights do not compress), identified by its sha256.

Nothing in a state is trusted before it is checked (`unpack`): a member whose name leaves the state
(absolute, `..`), a link or a device refuses the whole archive before anything is extracted; the manifest's
fields must have their types (its best step names a directory); and every pickle the trainer will read must
load with `weights_only=True`, as the trainer loads it, so one that would run code is refused here, before
training starts, and the job falls back to an older state. The trainer's pickled `training_args.bin` is read
by nothing and not extracted.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from app.adapter_format import FORMATS
from app.specs import PeftConfig, TrainingConfig
from worker.adapter_archive import PICKLE_SUFFIXES
from worker.tar_guard import GuardedTarFile, UnsafeTarHeader

MANIFEST_FILE = "phitune_state.json"
TRAINER_DIR = "trainer"
BEST_DIR = "best"
FORMAT_VERSION = 1
NEVER_LOADED = {"training_args.bin"}  # in every trainer checkpoint; a pickle of TrainingArguments
# The fields of a model's config.json that fix the shapes of its weights: what a state must match. Not the
# whole file, which also records where it was loaded from and by which transformers version.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


class InvalidState(Exception):
    """A resume state that must not be loaded: truncated, corrupt, or another job's."""


@dataclass
class Manifest:
    step: int
    fingerprint: str
    best: dict[str, Any] | None = None  # the best checkpoint so far: step, metrics, formats (in BEST_DIR)
    eval_losses: dict[str, float] = field(default_factory=dict)  # step (as a string) → eval loss
    version: int = FORMAT_VERSION


def fingerprint(model_config: dict[str, Any], training: TrainingConfig, peft: PeftConfig) -> str:
    """What a state belongs to: the base model's architecture and the job's recipe. A state whose fingerprint
    differs was trained on something else and would not continue this job. Values left at their defaults
    are left out, so a worker whose schema gained a field (with a default) still accepts older states."""
    identity = {
        "model": {field: model_config.get(field) for field in ARCHITECTURE_FIELDS},
        "training_config": training.model_dump(mode="json", exclude_defaults=True),
        "peft_config": peft.model_dump(mode="json", exclude_defaults=True),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST_FILE).write_text(json.dumps(asdict(manifest)))


def read_manifest(directory: Path) -> Manifest:
    return Manifest(**json.loads((directory / MANIFEST_FILE).read_text()))


def pack(directory: Path, archive: Path) -> str:
    """Tar a state directory; returns the archive's sha256."""
    with tarfile.open(archive, "w") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
    return file_sha256(archive)


def unpack(archive: Path, destination: Path, *, sha256: str, expected_fingerprint: str) -> Manifest:
    """Check an archive against its recorded sha256, extract it and check it belongs to this job."""
    if file_sha256(archive) != sha256:
        raise InvalidState("its sha256 does not match the one recorded when it was stored")
    try:
        # "r:": uncompressed, as `pack` writes it, so the archive is as large as what it unpacks to.
        with GuardedTarFile.open(archive, "r:") as tar:
            members = [_checked(member) for member in tar.getmembers()]  # all, before extracting any
            wanted = [member for member in members if PurePosixPath(member.name).name not in NEVER_LOADED]
            tar.extractall(destination, members=wanted, filter="data")
        manifest = read_manifest(destination)
    except UnsafeTarHeader as exc:
        raise InvalidState(f"it {exc}") from exc
    except (tarfile.TarError, OSError, ValueError, TypeError, RecursionError) as exc:
        raise InvalidState(f"it cannot be read ({type(exc).__name__}: {exc})") from exc
    _check_manifest(manifest)
    if manifest.version != FORMAT_VERSION:
        raise InvalidState(f"it has format version {manifest.version}, this worker reads {FORMAT_VERSION}")
    if manifest.fingerprint != expected_fingerprint:
        raise InvalidState("it was trained with another base model or recipe")
    _check_pickles(destination)
    return manifest


def _checked(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """The member, if it is a plain file or directory inside the state."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise InvalidState(f"it holds a path outside the state ({member.name})")
    if member.issym() or member.islnk():
        raise InvalidState(f"it holds a link ({member.name} -> {member.linkname})")
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise InvalidState(f"it holds {member.name}, which is neither a file nor a directory")
    return member


def _check_manifest(manifest: Manifest) -> None:
    """The manifest's fields have the types the recipe reads them as: a hostile best step could otherwise
    name a directory anywhere."""
    best = manifest.best
    valid = (
        _is_int(manifest.version)
        and _is_int(manifest.step)
        and isinstance(manifest.fingerprint, str)
        and isinstance(manifest.eval_losses, dict)
        and all(
            isinstance(step, str) and step.isdecimal() and step.isascii() and _is_number(loss)
            for step, loss in manifest.eval_losses.items()
        )
        and (
            best is None
            or isinstance(best, dict)
            and _is_int(best.get("step"))
            and isinstance(best.get("metrics"), dict)
            and isinstance(best.get("formats"), list)
            and all(fmt in FORMATS for fmt in best["formats"])
        )
    )
    if not valid:
        raise InvalidState(f"its {MANIFEST_FILE} is malformed")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_pickles(directory: Path) -> None:
    """Load every pickle of an unpacked state as the trainer will, with `weights_only=True` and the numpy
    types it allows for the RNG state, its tensors memory-mapped (not read); InvalidState for one that does
    not load so: it would run code, or fail the attempt midway."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for path in sorted(directory.rglob("*")):
        if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
            try:
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # UnpicklingError for a forbidden global, RuntimeError for a bad file
                name = path.relative_to(directory)
                raise InvalidState(f"{name} does not load as plain tensors ({type(exc).__name__})") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
