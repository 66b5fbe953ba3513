"""Which extras (`phitune[train]`, `phitune[serve]`) this install has: the process commands that need one say
what to install rather than failing at an import."""

from __future__ import annotations

import importlib.util
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from phitune.cli.output import fail

DISTRIBUTION = "phitune"
# Where the extras are read from when phitune runs from a source tree that was never installed.
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def extra_requirements(extra: str) -> list[Requirement]:
    """What `phitune[extra]` adds to the base install: from the installed distribution's metadata, else from
    pyproject.toml beside this package, else nothing (a missing library then fails at its import)."""
    try:
        requirements = [Requirement(line) for line in metadata.requires(DISTRIBUTION) or []]
    except metadata.PackageNotFoundError:
        try:
            project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
            lines = project["optional-dependencies"].get(extra, [])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return []
        requirements = [Requirement(line) for line in lines]
        return [r for r in requirements if r.marker is None or r.marker.evaluate()]
    # The extra's own lines; a base dependency's marker (a platform's, say) holds without the extra too.
    return [
        r
        for r in requirements
        if r.marker and r.marker.evaluate({"extra": extra}) and not r.marker.evaluate({"extra": ""})
    ]


def extra_modules(extra: str) -> list[str]:
    """The top-level modules `phitune[extra]` installs. Each distribution the extras name is imported under
    its own name (tests/test_install_boundaries.py checks it), so no table of import names is kept."""
    modules = []
    for requirement in extra_requirements(extra):
        name = canonicalize_name(requirement.name)
        if name == DISTRIBUTION:  # an extra made of others, as dev is
            modules += [module for other in sorted(requirement.extras) for module in extra_modules(other)]
        else:
            modules.append(name.replace("-", "_"))
    return modules


def require_extras(*extras: str) -> None:
    """Fail saying what to install when a command needs an extra this install lacks."""
    missing = [
        extra for extra in extras if any(importlib.util.find_spec(m) is None for m in extra_modules(extra))
    ]
    if missing:
        fail(f"this command needs phitune[{','.join(missing)}]: pip install 'phitune[{','.join(extras)}]'")
