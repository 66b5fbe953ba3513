"""Wheels for the GPU check on a machine without internet, which `bench/gpu_check.sh` installs from.

    python -m bench.gpu_wheels                   # into bench/wheels/ (git-ignored); or `make gpu-wheels`
    python -m bench.gpu_wheels --python 3.10 --with bitsandbytes --without transformers

It carries what `bench.gpu_check` imports (its REQUIRED distributions, and bitsandbytes for the QLoRA
sections) and everything they require, at the versions installed here, which must satisfy pyproject.toml's
pins; except torch and what only torch requires (the GPU machine has its CUDA torch), and except TOO_BIG,
which the machine must already have (the check names what it lacks). A distribution travels as a
pure-Python wheel where it has one, else as manylinux x86_64 wheels for CPython PYTHONS (an abi3 or
py3-none wheel serves them all). Beside the wheels, requirements.txt lists the check's own requirements with
pyproject.toml's specifiers, and setuptools for `pip install --no-build-isolation -e .`. It prints one JSON
line (the wheels' total size, the platform-specific ones, what was left out and why) and fails (exit status
1) when the folder exceeds LIMIT_MIB, what the GPU machine's carry allows.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from bench.gpu_check import QLORA_PACKAGE, REQUIRED
from phitune.launch import REPO

DEST = REPO / "bench" / "wheels"
LIMIT_MIB = 64
PYTHONS = ("3.11", "3.12")  # pyproject's requires-python is >=3.11; CUDA images ship 3.11 or 3.12
ON_THE_MACHINE = {"torch": "the GPU machine's own CUDA build"}
# One wheel's size in MB: with bitsandbytes the folder would hold ~80 MiB for one Python version.
TOO_BIG = {"pyarrow": 55, "bitsandbytes": 43, "numpy": 17, "pandas": 12}
# `pip install --no-build-isolation -e .` builds with the machine's setuptools; pyproject's license field
# needs 77.
BUILD = {"setuptools": ">=77"}
MANYLINUX = [f"manylinux_2_{minor}_x86_64" for minor in range(34, 16, -1)] + ["manylinux2014_x86_64"]
SAVED = re.compile(r"^(?:Saved|File was already downloaded) (.+\.whl)$")


def pins() -> dict[str, Requirement]:
    """pyproject.toml's requirements (the base install and every extra), by canonical name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [
        line for extra in project["optional-dependencies"].values() for line in extra
    ]
    requirements = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in requirements if canonicalize_name(r.name) != "phitune"}


def closure(roots: set[str], python: str, left_out: set[str]) -> dict[str, str | None]:
    """Canonical name → version installed here (None where it is not) of `roots` and all they require on
    CPython `python`, Linux x86_64, not looking into `left_out`."""
    environment = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    found: dict[str, str | None] = {}
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset()) for name in roots]
    while todo:
        name, extras = todo.pop()
        if name in left_out or name in found:
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            found[name] = None
            continue
        found[name] = distribution.version
        for line in distribution.requires or []:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras}
            )
            if wanted:
                todo.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return found


def pip_download(requirement: str, dest: Path, target: list[str]) -> list[Path]:
    """The wheels `pip download --no-deps` fetches for `requirement` on `target`; none if it has none."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
    ]
    done = subprocess.run([*command, *target, requirement], capture_output=True, text=True)
    if done.returncode != 0:
        return []
    return [Path(match.group(1)) for line in done.stdout.splitlines() if (match := SAVED.match(line.strip()))]


def download(requirement: str, dest: Path, pythons: tuple[str, ...]) -> list[Path]:
    """A pure-Python wheel of `requirement` where there is one, else manylinux x86_64 wheels, for each of
    `pythons` (one wheel that serves every CPython 3 is fetched once)."""
    wheels: list[Path] = []
    for python in pythons:
        pure = ["--python-version", python, "--implementation", "py", "--abi", "none", "--platform", "any"]
        platforms = [option for platform in MANYLINUX for option in ("--platform", platform)]
        binary = ["--python-version", python, "--implementation", "cp", *platforms]
        fetched = pip_download(requirement, dest, pure) or pip_download(requirement, dest, binary)
        if not fetched:
            raise RuntimeError(f"no wheel of {requirement} for CPython {python} on manylinux x86_64")
        wheels += fetched
        if all(serves_every_python(wheel) for wheel in fetched):
            break
    return wheels


def serves_every_python(wheel: Path) -> bool:
    """A py3 / py2.py3 wheel, or a CPython abi3 one."""
    _, _, _, tags = parse_wheel_filename(wheel.name)
    return all(tag.interpreter in ("py3", "py2") or tag.abi == "abi3" for tag in tags)


def build(dest: Path, pythons: tuple[str, ...], carry: set[str], leave: set[str]) -> dict:
    """Fill `dest` afresh; the JSON report."""
    too_big = {name: size for name, size in TOO_BIG.items() if name not in carry}
    left_out = {name: why for name, why in ON_THE_MACHINE.items()}
    left_out |= {
        name: f"too big (a {size} MB wheel): the GPU machine must have it" for name, size in too_big.items()
    }
    left_out |= {name: "left out (--without): the GPU machine must have it" for name in leave}
    roots = {canonicalize_name(name) for name in [*REQUIRED.values(), QLORA_PACKAGE, *BUILD]}
    versions: dict[str, str | None] = {}
    for python in pythons:
        versions |= closure(roots, python, set(left_out))
    pinned = pins()
    off_pins = {
        name: version
        for name, version in versions.items()
        if version is not None
        and name in pinned
        and not pinned[name].specifier.contains(version, prereleases=True)
    }
    if off_pins:
        raise SystemExit(f"installed here outside pyproject.toml's pins: {off_pins}")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name, version in sorted(versions.items()):
        specifier = BUILD.get(name) or (str(pinned[name].specifier) if name in pinned else "")
        download(f"{name}=={version}" if version else f"{name}{specifier}", dest, pythons)
    top = sorted(name for name in roots if name in versions)
    lines = [f"{name}{BUILD.get(name) or (pinned[name].specifier if name in pinned else '')}" for name in top]
    (dest / "requirements.txt").write_text("".join(f"{line}\n" for line in lines))
    wheels = sorted(dest.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    return {
        "ok": size <= LIMIT_MIB,
        "dest": str(dest),
        "wheels": len(wheels),
        "total_mib": round(size, 1),
        "limit_mib": LIMIT_MIB,
        "pythons": list(pythons),
        "platform_specific": [wheel.name for wheel in wheels if not wheel.name.endswith("-any.whl")],
        "requirements": lines,
        "left_out": left_out,
        "not_installed_here": sorted(name for name, version in versions.items() if version is None),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--python", action="append", help=f"CPython versions (default {', '.join(PYTHONS)})")
    parser.add_argument(
        "--with", dest="carry", action="append", default=[], help=f"carry one of {list(TOO_BIG)}"
    )
    parser.add_argument("--without", action="append", default=[], help="leave a distribution out")
    options = parser.parse_args(argv)
    leave = {canonicalize_name(name) for name in options.without}
    report = build(options.dest, tuple(options.python or PYTHONS), set(options.carry), leave)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
