"""What each install gives: `pip install phitune` the API and the CLI without torch, `phitune[serve]` the
inference server without the training libraries, `phitune[train]` the worker (see pyproject.toml).

An install without an extra is simulated in a subprocess: the import names of every distribution outside
that install's dependency closure (computed from this environment's metadata) are made absent, as
`sys.modules[name] = None` does (`import` fails, `importlib.util.find_spec` answers None), so that the code
runs as it would where they were never installed.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
FIRST_PARTY = {"phitune", "app", "worker", "migrations", "tests", "bench", "examples"}
# What the API must never load: torch and the libraries built on it. (`tokenizers`, a Rust library without
# torch, is the base install's: the dataset report counts tokens with it.)
TRAINING_LIBRARIES = [
    "torch",
    "transformers",
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
# The API's modules that need an extra, each imported only where configured (app.storage.open_storage).
API_EXTRA_MODULES = {"app/storage/s3.py": "s3"}


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

import app.main
import migrations
import phitune.cli
from app.config import Settings
from app.jobs.service import read_model_config
from fastapi.testclient import TestClient
from typer.testing import CliRunner

data_dir = Path(sys.argv[2])
settings = Settings(data_dir=data_dir)
migrations.upgrade(settings.resolved_database_url)
response = TestClient(app.main.create_app(settings)).get("/readyz")
assert response.status_code == 200, response.text
(data_dir / "model").mkdir()
(data_dir / "model" / "config.json").write_text('{"model_type": "phi3"}')
assert read_model_config(str(data_dir / "model")) == {"model_type": "phi3"}
assert read_model_config("phitune-tests/not-in-the-hub-cache") is None
result = CliRunner().invoke(phitune.cli.app, ["--help"])
assert result.exit_code == 0, result.output
for command, extras in [
    (["worker"], "train"),
    (["inference"], "serve"),
    (["serve"], "train,serve"),
    (["make-tiny-model", str(data_dir / "tiny")], "serve"),
]:
    result = CliRunner().invoke(phitune.cli.app, command)
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
    assert "phitune[train,serve,trackers,s3]" in optional["dev"], "the tests need every part"
    assert {"torch", "trl", "datasets", "peft", "bitsandbytes"} <= install_closure("train")
    assert {"torch", "transformers", "peft", "loralib", "safetensors"} <= install_closure("serve")


def test_the_cli_checks_each_extra_as_the_installed_metadata_states_it() -> None:
    # phitune.cli.extras keeps no list of the extras' libraries: it reads them from the distribution's
    # metadata and imports each under its distribution's name, which that distribution must provide here.
    from phitune.cli.extras import extra_modules

    providers = metadata.packages_distributions()
    for extra in ["train", "serve"]:
        lines = PROJECT["optional-dependencies"][extra]
        wanted = {canonicalize_name(Requirement(line).name) for line in lines}
        modules = extra_modules(extra)
        provided = {canonicalize_name(d) for module in modules for d in providers.get(module, [])}
        assert len(modules) == len(wanted) and provided >= wanted, (
            f"phitune[{extra}]: {modules} against {sorted(wanted)}; a distribution imported under another "
            "name needs that name in phitune/cli/extras.py, or the installed metadata is older than "
            "pyproject.toml (pip install -e '.[dev]')"
        )
    assert set(extra_modules("dev")) >= set(extra_modules("train")) | {"pytest"}, "dev names the other extras"


def test_the_cli_reads_the_extras_from_pyproject_without_an_install(monkeypatch, tmp_path) -> None:
    from phitune.cli import extras

    installed = {extra: sorted(extras.extra_modules(extra)) for extra in ["train", "serve"]}

    def not_installed(name: str) -> list[str]:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "requires", not_installed)
    assert {extra: sorted(extras.extra_modules(extra)) for extra in installed} == installed
    # No metadata and no pyproject.toml: nothing to check against; the command's own imports say what lacks.
    monkeypatch.setattr(extras, "PYPROJECT", tmp_path / "pyproject.toml")
    assert extras.extra_modules("train") == []
    extras.require_extras("train", "serve")


def test_the_api_and_the_cli_import_no_training_library() -> None:
    loaded = run_python("import sys, json, app.main, phitune.cli; print(json.dumps(sorted(sys.modules)))")
    assert not [name for name in loaded if name.partition(".")[0] in TRAINING_LIBRARIES]


def test_the_api_and_the_cli_run_without_the_extras(tmp_path) -> None:
    absent = absent_import_names(install_closure())
    assert "torch" in absent and "fastapi" not in absent
    loaded = run_python(MAKE_ABSENT + API_AND_CLI, json.dumps(absent), str(tmp_path))
    assert not set(loaded) & set(TRAINING_LIBRARIES)


def python_files(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_path(name: str) -> Path | None:
    """The file of first-party module `name`, or None where it is not one (a name imported from a module)."""
    base = ROOT.joinpath(*name.split("."))
    return next((path for path in [base.with_suffix(".py"), base / "__init__.py"] if path.is_file()), None)


def imports(path: Path) -> Iterator[tuple[int, str, bool]]:
    """What `path` imports, function-level imports and `importlib.import_module("…")` too: (line, absolute
    module name, at module level). `from m import n` gives m and m.n, since n may be a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_level = {id(node) for node in tree.body}
    package = module_name(path).split(".")[: -1 if path.name != "__init__.py" else None]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [f"{module}.{alias.name}" for alias in node.names] + ([module] if node.module else [])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            yield node.lineno, name, id(node) in module_level


def test_the_import_scan_sees_lazy_imports() -> None:
    found = {(name, at_import) for _, name, at_import in imports(ROOT / "phitune" / "cli" / "processes.py")}
    assert {("worker.serving.server", False), ("typer", True), ("app.config.get_settings", False)} <= found
    found = {(name, at_import) for _, name, at_import in imports(ROOT / "worker" / "model_loader.py")}
    assert ("worker.hardware", True) in found


def test_nothing_in_the_api_imports_the_worker() -> None:
    # The API (its own slim image) never reaches into worker/, not even in a function; only the launcher,
    # phitune/, composes the API, the worker and the inference server.
    wrong = [
        f"{path.relative_to(ROOT)}:{line} {name}"
        for path in python_files("app", "migrations")
        for line, name, _ in imports(path)
        if name.partition(".")[0] == "worker"
    ]
    assert not wrong, wrong


def test_every_import_in_the_api_and_the_launcher_resolves_to_the_base_install() -> None:
    # Lazy imports too, which the tests above do not all run; only the launcher's commands that start the
    # worker or the inference server import worker/ (and need the extras), inside their functions.
    base = install_closure()
    providers = metadata.packages_distributions()
    wrong = []
    for path in python_files("phitune", "app", "migrations"):
        extra = API_EXTRA_MODULES.get(path.relative_to(ROOT).as_posix())
        installed = install_closure(extra) if extra else base
        for line, name, at_import in imports(path):
            top = name.partition(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} {top}"
            if top == "worker" and at_import:
                wrong.append(f"{where} (at import time)")
            elif top in FIRST_PARTY or top in sys.stdlib_module_names or top in ("__future__", ""):
                continue
            elif not any(canonicalize_name(d) in installed for d in providers.get(top, [])):
                wrong.append(f"{where} (not a base dependency)")
    assert not wrong, wrong


def test_the_inference_server_never_imports_the_training_recipe() -> None:
    # Every module of worker/serving/ and the worker modules they import, transitively, lazy imports included
    # (app/ imports neither worker/ nor a training library: the tests above).
    pending = [module_name(path) for path in python_files("worker/serving")]
    seen, wrong = set(), set()
    while pending:
        if (module := pending.pop()) in seen:
            continue
        seen.add(module)
        for line, name, _ in imports(module_path(module)):
            if any(name == recipe or name.startswith(f"{recipe}.") for recipe in RECIPE_MODULES):
                wrong.add(f"{module}:{line} {name}")
            elif name.partition(".")[0] == "worker" and module_path(name):
                pending.append(name)
    assert {"worker.model_loader", "worker.adapter_archive", "worker.bootstrap"} <= seen, "the scan got lost"
    assert not wrong, sorted(wrong)


def test_the_inference_server_loads_no_training_library_where_they_are_installed() -> None:
    # Here trl and datasets are importable: nothing that tries them (an `except ImportError` fallback) may.
    assert all(importlib.util.find_spec(name) for name in ["trl", "datasets"])
    loaded = run_python(SERVER)
    assert "worker.serving.server" in loaded
    assert not set(loaded) & set(RECIPE_MODULES)


def test_the_inference_server_runs_without_the_training_recipe() -> None:
    absent = absent_import_names(install_closure("serve"))
    assert "trl" in absent and "datasets" in absent and "torch" not in absent
    loaded = run_python(MAKE_ABSENT + SERVER, json.dumps(absent))
    assert not set(loaded) & set(RECIPE_MODULES)


def test_the_api_image_is_slim_and_the_gpu_services_keep_theirs() -> None:
    dockerfile = (ROOT / "Dockerfile.api").read_text(encoding="utf-8")
    assert any(line.startswith("FROM python:3.11-slim") for line in dockerfile.splitlines())
    installs = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    # The base install and the extras of the API's optional modules (API_EXTRA_MODULES), no other.
    api_extras = f'".[{",".join(sorted(set(API_EXTRA_MODULES.values())))}]"'
    assert installs and all(
        "[" not in line.replace(api_extras, ".") and "torch" not in line for line in installs
    ), installs
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
    for name in ["phitune", "app", "worker", "migrations"]:
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
