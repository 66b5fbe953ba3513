"""What each install gives: `pip install phitune` the API and the CLI without torch, `phitune[serve]` the
inference server without the training libraries, `phitune[train]` the worker (see pyproject.toml).

An install without an extra is simulated in a subprocess: the import names of every distribution outside
that install's dependency closure (computed from this environment's metadata) are made absent, as
`sys.modules[name] = None` does (`import` fails, `importlib.util.find_spec` answers None), so that the code
runs as it would where they were never installed.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
FIRST_PARTY = {"app", "worker", "migrations", "tests", "bench", "examples"}
# What the API must never load: torch and the libraries built on it.
TRAINING_LIBRARIES = [
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "trl",
    "datasets",
    "bitsandbytes",
    "loralib",
    "accelerate",
    "safetensors",
]
# What the inference server must not load: the training recipe and the libraries only it needs.
RECIPE_MODULES = ["trl", "datasets", "worker.recipe"]


def dependency_closure(requirement_lines: list[str]) -> set[str]:
    """The distributions (canonical names) an install of `requirement_lines` brings, following the metadata of
    the installed distributions; one not installed here is left out with its own dependencies."""
    found: set[str] = set()
    asked: set[tuple[str, str]] = set()
    pending = [(Requirement(line), "") for line in requirement_lines]
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        for wanted in ["", *requirement.extras]:
            if (name, wanted) in asked:
                continue
            asked.add((name, wanted))
            try:
                requires = project_requires() if name == "phitune" else metadata.requires(name) or []
            except metadata.PackageNotFoundError:
                continue
            found.add(name)
            pending.extend((Requirement(line), wanted) for line in requires)
    return found


def project_requires() -> list[str]:
    """phitune's requirements as pyproject.toml states them (the installed metadata may be older), in the form
    of `metadata.requires`."""
    optional = PROJECT["optional-dependencies"]
    extra_lines = [
        f"{line}; extra == '{extra}'" if ";" not in line else f"{line} and extra == '{extra}'"
        for extra, lines in optional.items()
        for line in lines
    ]
    return [*PROJECT["dependencies"], *extra_lines]


def install_closure(*extras: str) -> set[str]:
    return dependency_closure([f"phitune[{','.join(extras)}]" if extras else "phitune"])


def absent_import_names(installed: set[str]) -> list[str]:
    """The top-level import names that only distributions outside `installed` provide."""
    names = []
    for name, distributions in metadata.packages_distributions().items():
        if name in FIRST_PARTY or name in sys.stdlib_module_names:
            continue
        if not any(canonicalize_name(distribution) in installed for distribution in distributions):
            names.append(name)
    return sorted(names)


def run_python(code: str, *args: str, cwd: Path = ROOT) -> list[str]:
    """Run `code` in a fresh interpreter; its last line of output, as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHITUNE_")} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MAKE_ABSENT = """
import json, sys
for name in json.loads(sys.argv[1]):
    sys.modules.setdefault(name, None)
"""

API_AND_CLI = """
import json, sys
from pathlib import Path

import app.cli
import app.main
import migrations
from app.config import Settings
from app.jobs.service import read_model_config
from click.testing import CliRunner
from fastapi.testclient import TestClient

data_dir = Path(sys.argv[2])
settings = Settings(data_dir=data_dir)
migrations.upgrade(settings.resolved_database_url)
response = TestClient(app.main.create_app(settings)).get("/readyz")
assert response.status_code == 200, response.text
(data_dir / "model").mkdir()
(data_dir / "model" / "config.json").write_text('{"model_type": "phi3"}')
assert read_model_config(str(data_dir / "model")) == {"model_type": "phi3"}
assert read_model_config("phitune-tests/not-in-the-hub-cache") is None
result = CliRunner().invoke(app.cli.main, ["--help"])
assert result.exit_code == 0, result.output
for command, extras in [
    (["worker"], "train"),
    (["inference"], "serve"),
    (["serve"], "train,serve"),
    (["make-tiny-model", str(data_dir / "tiny")], "serve"),
]:
    result = CliRunner().invoke(app.cli.main, command)
    assert result.exit_code == 1 and f"needs phitune[{extras}]" in result.output, (command, result.output)
print(json.dumps(sorted({name.partition(".")[0] for name, module in sys.modules.items() if module})))
"""

SERVER = """
import json, sys

import worker.serving.server

print(json.dumps(sorted(name for name, module in sys.modules.items() if module)))
"""


def test_the_base_install_brings_no_training_library() -> None:
    assert install_closure("dev") >= {"torch", "trl", "pytest"}, "the closure walk misses dependencies"
    base = install_closure()
    assert base >= {"fastapi", "sqlalchemy", "celery", "huggingface-hub"}
    assert not base & set(TRAINING_LIBRARIES)
    assert not install_closure("serve") & {"trl", "datasets"}


def test_the_extras() -> None:
    optional = PROJECT["optional-dependencies"]
    assert {"train", "serve", "dev"} <= set(optional)
    assert "phitune[train,serve]" in optional["dev"], "the tests need both the worker and the server"
    assert {"torch", "trl", "datasets", "peft", "bitsandbytes"} <= install_closure("train")
    assert {"torch", "transformers", "peft", "loralib", "safetensors"} <= install_closure("serve")


def test_the_api_and_the_cli_import_no_training_library() -> None:
    loaded = run_python("import sys, json, app.main, app.cli; print(json.dumps(sorted(sys.modules)))")
    assert not [name for name in loaded if name.partition(".")[0] in TRAINING_LIBRARIES]


def test_the_api_and_the_cli_run_without_the_extras(tmp_path) -> None:
    absent = absent_import_names(install_closure())
    assert "torch" in absent and "fastapi" not in absent
    loaded = run_python(MAKE_ABSENT + API_AND_CLI, json.dumps(absent), str(tmp_path))
    assert not set(loaded) & set(TRAINING_LIBRARIES)


def test_every_import_in_the_api_resolves_to_the_base_install() -> None:
    # Lazy imports too, which the tests above do not all run; only the CLI commands that start the worker or
    # the inference server import worker/ (and need the extras), inside their functions.
    base = install_closure()
    providers = metadata.packages_distributions()
    wrong = []
    for path in sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "migrations").rglob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.partition(".")[0] for name in names}:
                where = f"{path.relative_to(ROOT)}:{node.lineno} {top}"
                if top == "worker" and id(node) in module_level:
                    wrong.append(f"{where} (at import time)")
                elif top in FIRST_PARTY or top in sys.stdlib_module_names or top == "__future__":
                    continue
                elif not any(canonicalize_name(d) in base for d in providers.get(top, [])):
                    wrong.append(f"{where} (not a base dependency)")
    assert not wrong, wrong


def test_the_inference_server_runs_without_the_training_recipe() -> None:
    absent = absent_import_names(install_closure("serve"))
    assert "trl" in absent and "datasets" in absent and "torch" not in absent
    loaded = run_python(MAKE_ABSENT + SERVER, json.dumps(absent))
    assert not set(loaded) & set(RECIPE_MODULES)


def test_the_api_image_is_slim_and_the_gpu_services_keep_theirs() -> None:
    dockerfile = (ROOT / "Dockerfile.api").read_text(encoding="utf-8")
    assert any(line.startswith("FROM python:3.11-slim") for line in dockerfile.splitlines())
    installs = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    assert installs and all("[" not in line and "torch" not in line for line in installs), installs
    assert 'CMD ["phitune", "api"' in dockerfile
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    images = {
        name: service["build"]["dockerfile"] for name, service in services.items() if "build" in service
    }
    assert images == {
        "migrate": "Dockerfile.api",
        "api": "Dockerfile.api",
        "worker": "Dockerfile.gpu",
        "inference": "Dockerfile.gpu",
    }


@pytest.mark.skipif(
    not os.environ.get("PHITUNE_TEST_REAL_INSTALL"),
    reason="downloads from PyPI: set PHITUNE_TEST_REAL_INSTALL=1",
)
def test_a_real_base_install_runs_the_api_without_torch(tmp_path) -> None:
    # `pip install .` into a fresh virtualenv, as Dockerfile.api does (about 30 s with a warm network).
    source = tmp_path / "source"
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, source)
    for name in ["app", "worker", "migrations"]:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", str(source)], check=True, timeout=600)
    (tmp_path / "data").mkdir()
    code = (
        "import importlib.util as u; assert u.find_spec('torch') is None, 'torch installed'\n" + API_AND_CLI
    )
    done = subprocess.run(
        [python, "-c", code, "[]", str(tmp_path / "data")],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
