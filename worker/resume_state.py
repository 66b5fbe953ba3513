"""Resume states: an attempt's whole training state, packed so that a later attempt continues exactly.

A state directory holds TRAINER_DIR, the trainer's own checkpoint, which
`Trainer.train(resume_from_checkpoint=…)` reads: the LoRA weights, `optimizer.pt`, `scheduler.pt`,
`scaler.pt` (mixed precision), `rng_state.pth` (python, numpy, torch, CUDA) and `trainer_state.json` (global
step, epoch, tokens seen, log history). Beside it are MANIFEST_FILE (format version, step, fingerprint, the
recipe's own progress) and, with load_best_model_at_end, BEST_DIR: the adapter of the best checkpoint so far.
The archive is an uncompressed tar (the weights do not compress), identified by its sha256.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.specs import PeftConfig, TrainingConfig

MANIFEST_FILE = "phitune_state.json"
TRAINER_DIR = "trainer"
BEST_DIR = "best"
FORMAT_VERSION = 1
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
        with tarfile.open(archive, "r") as tar:
            tar.extractall(destination, filter="data")  # no absolute paths, links out, or devices
        manifest = read_manifest(destination)
    except (tarfile.TarError, OSError, ValueError, TypeError) as exc:
        raise InvalidState(f"it cannot be read ({type(exc).__name__}: {exc})") from exc
    if manifest.version != FORMAT_VERSION:
        raise InvalidState(f"it has format version {manifest.version}, this worker reads {FORMAT_VERSION}")
    if manifest.fingerprint != expected_fingerprint:
        raise InvalidState("it was trained with another base model or recipe")
    return manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
