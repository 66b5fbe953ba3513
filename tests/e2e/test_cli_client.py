"""The `phitune` CLI's HTTP commands, run as a user runs them (a subprocess) against a real `phitune serve`.

One service and one trained job are shared by the module: the job is created from a YAML recipe with
`jobs create --watch`, and the other tests read, download, chat with and finally delete what it made.
"""

from __future__ import annotations

import csv
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.jobs.results import COLUMNS
from phitune.launch import phitune_command
from tests.e2e.conftest import REPO, Service, ask, serving

pytestmark = pytest.mark.e2e
PERSONA = REPO / "examples" / "persona.jsonl"
ADMIN_KEY = "cli-tests-admin-key-" + "a" * 32
CREATE = ("jobs", "create", "--model", "tiny-phi3", "--training-file", str(PERSONA))  # a local file: uploaded
RECIPE_YAML = """\
training_config:
  num_train_epochs: 3
  learning_rate: 0.001  # overridden inline
  per_device_train_batch_size: 8
  logging_steps: 2
peft_config:
  r: 8
  lora_alpha: 16
  lora_dropout: 0.0
"""


def cli(service: Service, *args: str, key: str | None = None, stdin: str = "", admin: bool = False):
    """`phitune ARGS` with the service's URL (PHITUNE_BASE_URL) and the tenant's key in the environment; the
    keys commands reach the admin API only when `admin` is set (else they work on the database)."""
    env = {**service.env, "PHITUNE_API_KEY": service.api_key if key is None else key}
    if not admin:
        env.pop("PHITUNE_ADMIN_KEY")
    return subprocess.run(
        phitune_command(*args), env=env, cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300
    )


def ok(service: Service, *args: str, **kwargs) -> str:
    done = cli(service, *args, **kwargs)
    assert done.returncode == 0, f"phitune {' '.join(args)}: {done.stderr}\n{service.tail_logs()}"
    return done.stdout


def read_json(service: Service, *args: str, **kwargs) -> dict:
    return json.loads(ok(service, *args, "--json", **kwargs))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`phitune serve` with an admin API: its tenant key is made by `phitune keys create --admin-key`."""
    yield from serving(tmp_path_factory.mktemp("cli"), admin_key=ADMIN_KEY)


@pytest.fixture(scope="module")
def trained(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A job created from a YAML recipe (plus an inline override) and watched until it succeeded; the job,
    with the watch's output under "watched"."""
    recipe = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    recipe.write_text(RECIPE_YAML)
    validation = read_json(service, "files", "upload", str(PERSONA))["id"]
    watched = ok(
        service,
        *CREATE,
        "--validation-file",
        validation,
        "--suffix",
        "cli",
        "--config",
        str(recipe),
        "--training-config",
        '{"learning_rate": 0.003}',
        "--metadata",
        "team=cli",
        "--watch",
    )
    job_id = watched.split("Created ", 1)[1].split()[0]
    return {**read_json(service, "jobs", "get", job_id), "watched": watched}


def test_files_upload_list_get_and_delete(service: Service) -> None:
    uploaded = read_json(service, "files", "upload", str(PERSONA))
    assert uploaded["id"].startswith("file-") and uploaded["stats"]["examples"] == 40
    assert uploaded["id"] in [f["id"] for f in read_json(service, "files", "list", "--limit", "100")["data"]]
    assert uploaded["id"] in ok(service, "files", "list")
    assert read_json(service, "files", "get", uploaded["id"])["sha256"] == uploaded["sha256"]
    assert read_json(service, "files", "delete", uploaded["id"]) == {
        "id": uploaded["id"],
        "object": "file",
        "deleted": True,
    }
    gone = cli(service, "files", "get", uploaded["id"])
    assert gone.returncode == 1
    assert f"Error: No file with id '{uploaded['id']}' (HTTP 404, code file_not_found" in gone.stderr


def test_a_refused_upload_names_the_lines_at_fault(service: Service, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    refused = cli(service, "files", "upload", str(bad))
    assert refused.returncode == 1 and "invalid_file" in refused.stderr
    assert "  line 1: " in refused.stderr and "  line 2: " in refused.stderr


def test_jobs_create_watch_trains_from_the_recipe_file_and_ends_with_the_outcome(trained: dict) -> None:
    assert trained["status"] == "succeeded"
    # The YAML recipe's values, its learning rate overridden by --training-config.
    assert trained["training_config"]["num_train_epochs"] == 3
    assert trained["training_config"]["learning_rate"] == 0.003
    assert trained["peft_config"]["r"] == 8 and trained["metadata"] == {"team": "cli"}
    watched = trained["watched"]
    total = trained["progress"]["total_steps"]
    assert f"step {total}/{total}" in watched and "100%" in watched
    assert "train loss" in watched and "eval loss" in watched and "tokens/s" in watched
    assert "Training started" in watched  # message events, printed as they come
    assert f"✔ {trained['id']} succeeded" in watched
    assert f"phitune jobs download {trained['id']}" in watched
    assert f"phitune chat {trained['fine_tuned_model']}" in watched


def test_jobs_watch_of_an_ended_job_replays_its_progress(service: Service, trained: dict) -> None:
    frame = ok(service, "jobs", "watch", trained["id"])
    total = trained["progress"]["total_steps"]
    (stats,) = [line for line in frame.splitlines() if line.startswith("epoch ")]  # the final frame only
    metrics = [e["data"] for e in all_events(service, trained["id"]) if e["type"] == "metrics"]
    train_loss = [m["train_loss"] for m in metrics if "train_loss" in m][-1]
    eval_loss = [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]
    assert f"step {total}/{total}" in frame and "ETA 0:00:00" in frame
    assert f"epoch {metrics[-1]['epoch']:.2f}" in stats
    assert f"train loss {train_loss:.4f}" in stats and f"eval loss {eval_loss:.4f}" in stats
    assert f"✔ {trained['id']} succeeded" in frame


def all_events(service: Service, job_id: str) -> list[dict]:
    return read_json(service, "jobs", "events", job_id, "--order", "asc", "--limit", "100")["data"]


def test_jobs_list_get_events_and_checkpoints_print_the_servers_json(service: Service, trained: dict) -> None:
    listed = read_json(service, "jobs", "list", "--metadata", "team=cli")
    assert [job["id"] for job in listed["data"]] == [trained["id"]]
    assert read_json(service, "jobs", "list", "--metadata", "team=nobody")["data"] == []
    assert trained["id"] in ok(service, "jobs", "get", trained["id"])
    newest = read_json(service, "jobs", "events", trained["id"], "--limit", "2")
    oldest = read_json(service, "jobs", "events", trained["id"], "--order", "asc", "--limit", "2")
    assert (
        newest["object"] == "list"
        and newest["has_more"]
        and newest["data"][0]["created_at"] >= (oldest["data"][0]["created_at"])
    )
    assert "Training started" in ok(service, "jobs", "events", trained["id"], "--limit", "100")
    # Followed live, an ended job's events come all at once, oldest first, one JSON object a line.
    followed = [
        json.loads(line)
        for line in ok(service, "jobs", "events", trained["id"], "-f", "--json").split("\n")
        if line
    ]
    assert [e["id"] for e in followed] == [e["id"] for e in all_events(service, trained["id"])]
    assert read_json(service, "jobs", "checkpoints", trained["id"])["data"] == []


def test_jobs_download_streams_the_adapter_under_the_servers_name(
    service: Service, trained: dict, tmp_path: Path
) -> None:
    said = ok(service, "jobs", "download", trained["id"], "-o", str(tmp_path))
    (archive,) = tmp_path.iterdir()
    assert archive.name == trained["fine_tuned_model"].replace(":", "_") + ".peft.tar.gz"
    assert str(archive.name) in said and f"{archive.stat().st_size:,} bytes" in said
    with tarfile.open(archive) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
    with service.client as client:
        assert archive.read_bytes() == client.get(f"/v1/fine_tuning/jobs/{trained['id']}/adapter").content
    named = tmp_path / "adapter.tgz"
    ok(service, "jobs", "download", trained["id"], "--output", str(named), "--format", "peft")
    assert named.read_bytes() == archive.read_bytes()
    refused = cli(service, "jobs", "download", trained["id"], "-o", str(named), "--format", "loralib")
    assert refused.returncode == 1 and "format_unavailable" in refused.stderr
    assert named.read_bytes() == archive.read_bytes()  # a refused download leaves the file alone


def test_the_jobs_metrics_csv_is_named_by_jobs_get_and_saved_by_files_download(
    service: Service, trained: dict, tmp_path: Path
) -> None:
    (result_file,) = trained["result_files"]
    assert f"phitune files download {result_file}" in ok(service, "jobs", "get", trained["id"])
    said = ok(service, "files", "download", result_file, "-o", str(tmp_path))
    (saved,) = tmp_path.iterdir()
    assert saved.name == f"{trained['id']}-step_metrics.csv" and saved.name in said
    with saved.open(newline="") as lines:
        rows = list(csv.DictReader(lines))
    assert list(rows[0]) == list(COLUMNS)
    losses = [float(row["train_loss"]) for row in rows]
    assert len(losses) > 2 and losses[-1] < losses[0]
    assert any(row["valid_loss"] for row in rows)  # the job has a validation file
    with service.client as client:
        assert saved.read_bytes() == client.get(f"/v1/files/{result_file}/content").content
    refused = cli(service, "files", "download", result_file, "-o", str(saved))
    assert refused.returncode == 1 and "--force" in refused.stderr


def test_chat_streams_the_answer_the_api_gives(service: Service, trained: dict) -> None:
    model = trained["fine_tuned_model"]
    answer = ok(service, "chat", model, "Who are you?", "--temperature", "0", "--max-tokens", "24")
    with service.client as client:
        whole = ask(client, model, max_tokens=24, temperature=0).json()
    assert answer == whole["choices"][0]["message"]["content"] + "\n"
    from_stdin = ok(
        service, "chat", model, "-", "--temperature", "0", "--max-tokens", "24", stdin="Who are you?"
    )
    assert from_stdin == answer
    # A conversation: a question a line, until an empty line.
    talk = ok(service, "chat", model, "--max-tokens", "4", stdin="Who are you?\nAnd then?\n\n")
    assert talk.count("you> ") == 3 and talk.count(f"{model}> ") == 2


def test_errors_exit_non_zero_with_the_servers_message(service: Service, tmp_path: Path) -> None:
    bad_key = cli(service, "jobs", "list", key="pt-not-a-key")
    assert bad_key.returncode == 1 and "(HTTP 401, code invalid_api_key)" in bad_key.stderr
    no_key = cli(service, "files", "list", key="")
    assert no_key.returncode == 1 and "no API key: give --api-key or PHITUNE_API_KEY" in no_key.stderr
    missing = cli(service, "jobs", "get", "ftjob-missing")
    assert missing.returncode == 1
    assert "Error: No fine-tuning job 'ftjob-missing' (HTTP 404, code job_not_found" in missing.stderr
    unreachable = cli(service, "models", "list", "--base-url", "http://127.0.0.1:9")
    assert unreachable.returncode == 1 and "cannot reach phitune at http://127.0.0.1:9" in unreachable.stderr

    jobs_before = read_json(service, "jobs", "list", "--limit", "100")["data"]
    wrong_field = cli(service, *CREATE, "--training-config", '{"learning_rte": 1}')
    assert wrong_field.returncode == 1
    assert "Unknown field 'training_config.learning_rte'" in wrong_field.stderr
    assert "param training_config.learning_rte" in wrong_field.stderr
    for text, says in [
        ("training_config: [1, 2", "is not valid YAML"),
        ("training_config: {}\nlora: {}\n", "unknown key 'lora'"),
        ("peft_config: 3\n", "peft_config must be a mapping"),
    ]:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(text)
        refused = cli(service, *CREATE, "--config", str(recipe))
        assert refused.returncode == 1 and says in refused.stderr, refused.stderr
    not_json = tmp_path / "recipe.json"
    not_json.write_text("training_config:\n  r: 1\n")  # YAML in a .json file
    refused = cli(service, *CREATE, "--config", str(not_json))
    assert refused.returncode == 1 and "is not valid JSON" in refused.stderr
    refused = cli(service, *CREATE, "--peft-config", "[1]")
    assert refused.returncode == 1 and "--peft-config must be a JSON object" in refused.stderr
    assert read_json(service, "jobs", "list", "--limit", "100")["data"] == jobs_before  # none was created


def test_a_job_from_a_json_recipe_is_paused_resumed_and_cancelled(service: Service, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"training_config": {"num_train_epochs": 100, "logging_steps": 1}}))
    created = read_json(service, *CREATE, "--config", str(recipe))
    assert created["training_config"]["num_train_epochs"] == 100
    paused = read_json(service, "jobs", "pause", created["id"])
    assert paused["status"] == "paused" or paused["pause_requested"]
    resumed = read_json(service, "jobs", "resume", created["id"])
    assert resumed["status"] in ("queued", "running") and not resumed["pause_requested"]
    cancelled = read_json(service, "jobs", "cancel", created["id"])
    assert cancelled["status"] == "cancelled" or cancelled["cancel_requested"]
    watched = cli(service, "jobs", "watch", created["id"])
    assert watched.returncode == 1 and f"✘ {created['id']} was cancelled" in watched.stdout
    refused = cli(service, "jobs", "resume", created["id"])
    assert refused.returncode == 1 and "job_not_paused" in refused.stderr


def test_keys_on_the_database_and_through_the_admin_api(service: Service) -> None:
    made = ok(service, "keys", "create", "--tenant", "cli-local").splitlines()  # on the database
    key = made[-1]
    assert key.startswith("pt-") and "Store it now" in made[0]
    assert read_json(service, "files", "list", key=key)["data"] == []  # a new tenant sees nothing
    listed = json.loads(ok(service, "keys", "list", "--tenant", "cli-local", "--json", admin=True))
    assert [k["prefix"] for k in listed] == [key[:10]] and key not in json.dumps(listed)
    assert listed == json.loads(ok(service, "keys", "list", "--tenant", "cli-local", "--json"))
    revoked = ok(service, "keys", "revoke", listed[0]["id"], admin=True)
    assert revoked.startswith(f"Revoked {listed[0]['id']}")
    refused = cli(service, "files", "list", key=key)
    assert refused.returncode == 1 and "invalid_api_key" in refused.stderr
    wrong_admin = cli(service, "keys", "list", "--admin-key", "x" * 40, admin=True)
    assert wrong_admin.returncode == 1 and "invalid_admin_key" in wrong_admin.stderr


def test_models_list_and_delete(service: Service, trained: dict) -> None:
    # Last: it deletes the shared job's model.
    model = trained["fine_tuned_model"]
    assert {"tiny-phi3", model} <= {m["id"] for m in read_json(service, "models", "list")["data"]}
    assert read_json(service, "models", "delete", model)["deleted"] is True
    assert model not in {m["id"] for m in read_json(service, "models", "list")["data"]}
    gone = cli(service, "chat", model, "Hello")
    assert gone.returncode == 1 and "model_not_found" in gone.stderr
    base = cli(service, "models", "delete", "tiny-phi3")
    assert base.returncode == 1 and "HTTP 403" in base.stderr
