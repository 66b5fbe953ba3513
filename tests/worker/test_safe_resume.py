"""Resume states are checked before anything in them is loaded: an archive with a member outside the state,
a link or a device is refused before anything is extracted; a malformed manifest is refused; a pickle that
would run code is refused by `unpack`, and the trainer itself loads its pickles with `weights_only=True`."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import torch

from app.specs import PeftConfig, TrainingConfig
from tests.worker.conftest import Recorder, persona_inputs
from worker import resume_state
from worker.recipe import train
from worker.tar_guard import MAX_EXTENDED_HEADER_BYTES

TRAINING_CONFIG = TrainingConfig(
    max_steps=3, per_device_train_batch_size=8, logging_steps=1, save_steps=2, seed=5
)
PEFT_CONFIG = PeftConfig(r=4, lora_alpha=8)


class RunsCode:
    """Unpickled, it creates `marker`: what a hostile optimizer.pt would do with a plain `torch.load`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def state(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine resume state of step 2."""
    recorder = Recorder()
    output_dir = tmp_path_factory.mktemp("run")
    inputs = persona_inputs(
        tiny_model_dir, training_config=TRAINING_CONFIG, peft_config=PEFT_CONFIG, output_dir=output_dir
    )
    train(inputs, recorder)
    return recorder.states[2]


def fingerprint(state: Path) -> str:
    return resume_state.read_manifest(state).fingerprint


def unpack(state: Path, archive: Path, destination: Path) -> resume_state.Manifest:
    """Unpack an archive as the worker does, its sha256 being the one recorded when it was stored."""
    return resume_state.unpack(
        archive,
        destination,
        sha256=resume_state.file_sha256(archive),
        expected_fingerprint=fingerprint(state),
    )


def repacked(state: Path, archive: Path, *extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    """The genuine state's files, then `extra` members (each regular one holding `data`)."""
    with tarfile.open(archive, "w") as tar:
        for path in sorted(state.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(state)))
        for member in extra:
            if member.isreg():
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)
    return archive


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_a_genuine_state_unpacks_without_the_pickle_nothing_reads(state: Path, tmp_path: Path) -> None:
    archive = repacked(state, tmp_path / "state.tar")
    assert unpack(state, archive, tmp_path / "state").step == 2  # its RNG state loads with weights_only
    trainer_dir = tmp_path / "state" / resume_state.TRAINER_DIR
    assert (trainer_dir / "optimizer.pt").is_file() and (trainer_dir / "rng_state.pth").is_file()
    assert (state / resume_state.TRAINER_DIR / "training_args.bin").is_file()
    assert not (trainer_dir / "training_args.bin").exists()


@pytest.mark.parametrize(
    ("hostile", "refusal"),
    [
        (member("../escaped.txt"), "outside the state"),
        (member("trainer/../../escaped.txt"), "outside the state"),
        (member("/tmp/phitune-absolute.txt"), "outside the state"),
        (member("trainer/link", tarfile.SYMTYPE, "/etc/passwd"), "a link"),
        (member("trainer/inside-link", tarfile.SYMTYPE, "optimizer.pt"), "a link"),
        (member("trainer/hardlink", tarfile.LNKTYPE, "trainer/optimizer.pt"), "a link"),
        (member("trainer/device", tarfile.CHRTYPE), "neither a file nor a directory"),
        (member("trainer/fifo", tarfile.FIFOTYPE), "neither a file nor a directory"),
    ],
)
def test_an_archive_with_a_member_outside_the_state_or_a_link_is_refused_whole(
    state: Path, tmp_path: Path, hostile: tarfile.TarInfo, refusal: str
) -> None:
    archive = repacked(state, tmp_path / "hostile.tar", hostile, data=b"outside")
    destination = tmp_path / "work" / "state"
    with pytest.raises(resume_state.InvalidState, match=refusal):
        unpack(state, archive, destination)
    assert not destination.exists()  # refused before anything was extracted
    assert not (tmp_path / "work" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def with_pax_digits(name: str) -> tarfile.TarInfo:
    """A member whose pax header holds 1 MiB of digits: tarfile reads it whole and parses it quadratically."""
    info = member(name)
    info.pax_headers = {"comment": "1" * (1 << 20)}
    return info


def test_an_oversized_pax_header_is_refused_before_it_is_read(state: Path, tmp_path: Path) -> None:
    archive = repacked(state, tmp_path / "hostile.tar", with_pax_digits("trainer/notes.txt"))
    destination = tmp_path / "state"
    started = time.monotonic()
    with pytest.raises(
        resume_state.InvalidState, match=f"more than the {MAX_EXTENDED_HEADER_BYTES} one may have"
    ):
        unpack(state, archive, destination)
    assert time.monotonic() - started < 2
    assert not destination.exists()


def test_an_oversized_gnu_long_name_is_refused_before_it_is_read(state: Path, tmp_path: Path) -> None:
    archive = repacked(state, tmp_path / "hostile.tar")
    with tarfile.open(archive, "a", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("trainer/" + "n" * (1 << 20)), io.BytesIO())
    started = time.monotonic()
    with pytest.raises(resume_state.InvalidState, match="extended header of"):
        unpack(state, archive, tmp_path / "state")
    assert time.monotonic() - started < 2


def test_a_compressed_state_is_refused(state: Path, tmp_path: Path) -> None:
    """States are stored uncompressed: a gzip (which could expand a thousandfold) is not one."""
    plain = repacked(state, tmp_path / "state.tar")
    archive = tmp_path / "state.tar.gz"
    archive.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
    with pytest.raises(resume_state.InvalidState, match="cannot be read"):
        unpack(state, archive, tmp_path / "state")


def test_a_state_with_long_member_names_still_unpacks(state: Path, tmp_path: Path) -> None:
    """Names past ustar's 100 bytes (a pax header, a GNU long name) are read as before."""
    archive = repacked(state, tmp_path / "state.tar", member("trainer/" + "p/" * 150 + "p.txt"), data=b"x")
    with tarfile.open(archive, "a", format=tarfile.GNU_FORMAT) as tar:
        info = member("trainer/" + "g/" * 150 + "g.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    assert unpack(state, archive, tmp_path / "state").step == 2
    assert (tmp_path / "state" / "trainer" / ("g/" * 150 + "g.txt")).read_bytes() == b"x"


@pytest.mark.parametrize(
    "manifest",
    [
        {"best": {"step": "../../outside", "metrics": {}, "formats": ["peft"]}},
        {"best": {"step": 2, "metrics": {}, "formats": ["../x"]}},
        {"best": "not an object"},
        {"step": "2"},
        {"eval_losses": {"../2": 0.5}},
        {"eval_losses": {"2": "NaN"}},
    ],
)
def test_a_malformed_manifest_is_refused(state: Path, tmp_path: Path, manifest: dict) -> None:
    forged = tmp_path / "forged"
    shutil.copytree(state, forged)
    fields = json.loads((state / resume_state.MANIFEST_FILE).read_text()) | manifest
    (forged / resume_state.MANIFEST_FILE).write_text(json.dumps(fields))
    archive = repacked(forged, tmp_path / "forged.tar")
    with pytest.raises(resume_state.InvalidState, match="malformed"):
        unpack(state, archive, tmp_path / "state")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth", "scheduler.pt"])
def test_a_pickle_that_would_run_code_is_refused_before_training(
    state: Path, tmp_path: Path, name: str
) -> None:
    marker = tmp_path / "code-ran"
    forged = tmp_path / "forged"
    shutil.copytree(state, forged)
    torch.save(RunsCode(marker), forged / resume_state.TRAINER_DIR / name)
    archive = repacked(forged, tmp_path / "forged.tar")
    with pytest.raises(resume_state.InvalidState, match=f"{name} does not load as plain tensors"):
        unpack(state, archive, tmp_path / "state")
    assert not marker.exists()


def test_the_trainer_loads_the_optimizer_state_with_weights_only(
    state: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Past `unpack` (as if it had let one through), transformers' Trainer still refuses the pickle."""
    marker = tmp_path / "code-ran"
    forged = tmp_path / "forged"
    shutil.copytree(state, forged)
    torch.save(RunsCode(marker), forged / resume_state.TRAINER_DIR / "optimizer.pt")
    inputs = persona_inputs(
        tiny_model_dir,
        training_config=TRAINING_CONFIG,
        peft_config=PEFT_CONFIG,
        output_dir=tmp_path / "run",
        resume_from=forged,
    )
    with pytest.raises(Exception, match="Weights only load failed"):
        train(inputs, Recorder())
    assert not marker.exists()
