"""Dockerfile.gpu against what the project runs with: its base image's torch must satisfy pyproject.toml (the
base dependencies and the extras the image installs) and the torch requirement every installed library
declares, or the image installs but cannot train."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parents[1]
DOCKERFILE = (ROOT / "Dockerfile.gpu").read_text(encoding="utf-8")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# The image runs the training worker (with its experiment trackers) and the inference server: the base
# install and these extras.
IMAGE_EXTRAS = {"train", "serve", "trackers"}
# The libraries that run on the image's torch, and the extras of theirs phitune relies on.
TORCH_USERS = {
    "transformers": {"torch"},
    "peft": set(),
    "accelerate": set(),
    "bitsandbytes": set(),
}


def image_torch() -> Version:
    match = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-\w+$", DOCKERFILE, re.M)
    assert match, "Dockerfile.gpu must build FROM an official pytorch/pytorch CUDA image"
    return Version(match.group(1))


def image_extras() -> set[str]:
    """The extras of phitune the image's `pip install` names."""
    match = re.search(r'pip install [^\n]*"\.\[([\w,-]+)\]"', DOCKERFILE)
    assert match, 'Dockerfile.gpu must install phitune with its extras, as `pip install ".[train,serve]"`'
    return set(match.group(1).split(","))


def requirement_lines(extras: set[str]) -> list[str]:
    optional = PROJECT["optional-dependencies"]
    return [*PROJECT["dependencies"], *(line for extra in sorted(extras) for line in optional[extra])]


def image_requirements() -> dict[str, Requirement]:
    """What pyproject.toml asks of each distribution in the image (base dependencies and IMAGE_EXTRAS)."""
    return {Requirement(line).name: Requirement(line) for line in requirement_lines(IMAGE_EXTRAS)}


REQUIREMENTS = image_requirements()


def declared_torch_requirements(distribution: str, extras: set[str]) -> list[Requirement]:
    """The torch requirements `distribution` declares for an install with `extras`."""
    found = []
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.name != "torch":
            continue
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            found.append(requirement)
    return found


def test_the_image_installs_the_worker_and_the_server() -> None:
    # s3 (boto3, no torch) may come along, so that any phitune command in this image reaches a bucket.
    assert IMAGE_EXTRAS <= image_extras() <= IMAGE_EXTRAS | {"s3"}


def test_the_extras_agree_on_every_shared_requirement() -> None:
    # A library two extras name must be asked for alike, or the image's install depends on the extras' order.
    seen: dict[str, Requirement] = {}
    for line in requirement_lines(set(PROJECT["optional-dependencies"])):
        requirement = Requirement(line)
        if requirement.name == "phitune":  # dev names the other extras
            continue
        assert str(seen.setdefault(requirement.name, requirement)) == str(requirement), requirement.name


def test_the_image_keeps_its_torch() -> None:
    # pip may not swap the base image's torch for another: the install pins it to the image's version.
    assert re.search(rf'pip install [^\n]*"torch=={re.escape(str(image_torch()))}"', DOCKERFILE)


def test_the_image_torch_satisfies_pyproject() -> None:
    torch = image_torch()
    assert torch in REQUIREMENTS["torch"].specifier, f"pyproject.toml asks {REQUIREMENTS['torch']}"
    assert torch >= Version("2.6"), "transformers 5 disables torch below 2.6"


def test_the_image_torch_satisfies_every_library_that_uses_it() -> None:
    torch = image_torch()
    for distribution, extras in TORCH_USERS.items():
        assert distribution in REQUIREMENTS, f"{distribution} is not a dependency in pyproject.toml"
        for requirement in declared_torch_requirements(distribution, extras):
            library = f"{distribution} {metadata.version(distribution)}"
            assert torch in requirement.specifier, f"{library} needs {requirement}, not {torch}"


def test_the_tested_versions_satisfy_pyproject_and_every_dependency_has_a_floor() -> None:
    for distribution in [*TORCH_USERS, "torch", "trl", "tokenizers", "datasets"]:
        installed = Version(metadata.version(distribution))
        requirement = REQUIREMENTS[distribution]
        assert installed in requirement.specifier, f"{distribution} {installed} violates {requirement}"
        assert any(spec.operator == ">=" for spec in requirement.specifier), f"{requirement} has no floor"
    for requirement in REQUIREMENTS.values():
        assert any(spec.operator == ">=" for spec in requirement.specifier), f"{requirement} has no floor"
    # The recipe uses the APIs of transformers 5 and TRL 1.
    assert Version("4.99") not in REQUIREMENTS["transformers"].specifier
    assert Version("0.99") not in REQUIREMENTS["trl"].specifier


def test_the_image_has_a_c_compiler_for_triton() -> None:
    # Triton compiles its launcher with gcc at the first step.
    assert re.search(r"apt-get install .*\bgcc\b", DOCKERFILE)
