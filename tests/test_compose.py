"""docker-compose.yml exposes no more than it must: one published port, on the loopback by default; each
secret only in the services that present or check it; networks joining only services that talk."""

from __future__ import annotations

from pathlib import Path

import yaml

SERVICES = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())[
    "services"
]
TOKENS = {"PHITUNE_WORKER_TOKEN", "PHITUNE_SERVING_TOKEN", "PHITUNE_INFERENCE_TOKEN"}


def env(service: str) -> dict[str, str]:
    return SERVICES[service].get("environment", {})


def test_only_the_public_api_port_is_published_on_the_loopback_by_default() -> None:
    published = {name: service["ports"] for name, service in SERVICES.items() if service.get("ports")}
    assert published == {"api": ["${PHITUNE_PUBLISH_ADDRESS:-127.0.0.1}:8000:8000"]}


def test_each_service_holds_only_the_secrets_it_uses() -> None:
    assert set(env("api")) >= TOKENS
    assert set(env("worker")) & TOKENS == {"PHITUNE_WORKER_TOKEN"}
    assert set(env("inference")) & TOKENS == {"PHITUNE_SERVING_TOKEN", "PHITUNE_INFERENCE_TOKEN"}
    for service in ("worker", "inference"):  # they go through the API
        assert "PHITUNE_DATABASE_URL" not in env(service)
    assert "PHITUNE_BROKER_URL" not in env("inference")
    assert set(env("migrate")) & TOKENS == set()


def test_workers_and_the_inference_server_reach_the_api_on_its_internal_port_only() -> None:
    internal_port = env("api")["PHITUNE_INTERNAL_PORT"]
    assert "--internal-host" in SERVICES["api"]["command"]
    for service in ("worker", "inference"):
        assert env(service)["PHITUNE_API_URL"] == f"http://api:{internal_port}"


def test_networks_join_only_services_that_talk() -> None:
    networks = {name: set(service["networks"]) for name, service in SERVICES.items()}
    assert not networks["worker"] & networks["inference"]  # a worker cannot even reach the inference server
    for service in ("postgres", "redis"):
        assert not networks[service] & networks["inference"]
    for service in ("worker", "inference"):
        assert networks[service] <= networks["api"]
