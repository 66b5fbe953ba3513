"""Service benchmark: one fine-tuning job end to end through `phitune serve` ÷ the same training, called
directly.

`python -m bench service` starts `phitune serve` on a fresh data directory (SQLite, the filesystem broker, the
generated tiny Phi-3; every setting at its default) and times a job as a client sees it: upload the
quickstart's data (examples/persona.jsonl), create a job with the quickstart's training and LoRA config, poll
it until it ends, download the adapter archive and extract it. It runs two such jobs one after the other:
the first on the freshly started service (its worker imports torch and the training libraries when that job
arrives), the second on the warm one. The same training runs directly in this process, through
`worker.recipe.train` with the same model, file and configs and a reporter that does nothing, right before
the first job and right after the second: each job is compared with the direct run next to it in time, so
that a load that comes and goes on a shared machine weighs on both sides of a ratio alike. It reports:

    service_s            the first job: upload → adapter extracted, through the API and the worker process
    direct_s             `worker.recipe.train` alone (its imports done beforehand), before the first job
    overhead_s           service_s - direct_s
    overhead_ratio       service_s ÷ direct_s (target: service_s <= 1.05 × direct_s + 3 s: `meets_target`)
    warm_service_s, warm_direct_s, warm_overhead_ratio   the second job, against the direct run after it

with each job's time split as polling saw it (upload and create, queued, running, download) and `import_s`,
what importing the training recipe took in this process: the worker pays as much inside the first job; and
the machine's 1-minute load average before and after (2 means both cores busy), to judge the figures by.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from examples.quickstart import DATASET, PEFT_CONFIG, TRAINING_CONFIG
from phitune.launch import REPO, free_port, phitune_command, run_phitune, stop, wait_healthy

MODEL = "tiny-phi3"  # the embedded default's only base model, generated under the data dir
POLL_SECONDS = 0.1
FINAL = {"succeeded", "failed", "cancelled"}


def serve_env(data_dir: Path, port: int) -> dict[str, str]:
    """This environment without PHITUNE_ settings, on a fresh data dir: the embedded defaults."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PHITUNE_")}
    return env | {
        "PHITUNE_DATA_DIR": str(data_dir),
        "PHITUNE_API_URL": f"http://127.0.0.1:{port}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def run_job(client: httpx.Client, adapter_dir: Path) -> dict[str, float]:
    """One job as a client runs it; the seconds of each phase, and `service_s` in all."""
    start = time.perf_counter()
    with DATASET.open("rb") as body:
        files = {"file": (DATASET.name, body)}
        uploaded = client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    uploaded.raise_for_status()
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": MODEL,
            "training_file": uploaded.json()["id"],
            "training_config": TRAINING_CONFIG,
            "peft_config": PEFT_CONFIG,
        },
    )
    job.raise_for_status()
    job_id = job.json()["id"]
    created = time.perf_counter()
    running: float | None = None  # when the job was first seen claimed by the worker
    status = job.json()["status"]
    while status not in FINAL:
        time.sleep(POLL_SECONDS)
        status = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
        if running is None and status != "queued":
            running = time.perf_counter()
    if status != "succeeded":
        raise RuntimeError(f"the job ended {status}: {client.get(f'/v1/fine_tuning/jobs/{job_id}').json()}")
    finished = time.perf_counter()
    running = running or finished
    archive = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    archive.raise_for_status()
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(adapter_dir, filter="data")
    done = time.perf_counter()
    if not (adapter_dir / "adapter_model.safetensors").exists():
        names = sorted(path.name for path in adapter_dir.iterdir())
        raise RuntimeError(f"the archive holds no PEFT adapter: {names}")
    return {
        "service_s": done - start,
        "upload_and_create_s": created - start,
        "queued_s": running - created,
        "running_s": finished - running,
        "download_s": done - finished,
    }


def through_service(data_dir: Path, log: Path, *, jobs: int) -> list[dict[str, float]]:
    """Start `phitune serve`, wait until it serves, and time `jobs` jobs through it, one after the other."""
    port, inference_port = free_port(), free_port()
    env = serve_env(data_dir, port)
    with log.open("w") as out:
        server = subprocess.Popen(
            phitune_command("serve", "--port", str(port), "--inference-port", str(inference_port)),
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, processes=[server], timeout=180)
        wait_healthy(f"http://127.0.0.1:{inference_port}", processes=[server], timeout=180)
        key = run_phitune("keys", "create", "--tenant", "bench", env=env).strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            return [run_job(client, data_dir / f"downloaded-{index}") for index in range(jobs)]
    except Exception as error:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise RuntimeError(f"{error}\n--- phitune serve:\n{tail}") from error
    finally:
        stop(server, grace=90)


def direct(model_dir: Path, output_dir: Path) -> float:
    """Seconds of the same training called directly: `worker.recipe.train`, as the worker calls it."""
    from app.config import Settings
    from app.specs import PeftConfig, TrainingConfig
    from bench.train import CollectingReporter
    from worker.recipe import RecipeInputs, train

    inputs = RecipeInputs(
        base_model=str(model_dir),
        training_file=DATASET,
        validation_file=None,
        training_config=TrainingConfig(**TRAINING_CONFIG),
        peft_config=PeftConfig(**PEFT_CONFIG),
        output_dir=output_dir,
        resume_state_seconds=Settings().resume_state_seconds,  # as the worker passes it, from its settings
    )
    start = time.perf_counter()
    result = train(inputs, CollectingReporter()).result
    seconds = time.perf_counter() - start
    if result.adapter_dir is None or not (result.adapter_dir / "adapter_model.safetensors").exists():
        raise RuntimeError("the direct run saved no adapter")
    return seconds


def run() -> dict[str, Any]:
    start = time.perf_counter()
    import worker.recipe  # noqa: F401  (timed: the worker imports it when its first job arrives)

    import_s = time.perf_counter() - start
    from worker.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="phitune-bench-service-") as scratch:
        root = Path(scratch)
        data_dir = root / "data"
        # The model `phitune serve` generates on first use, generated here first: the same files.
        model_dir = make_tiny_model(data_dir / "models" / MODEL)
        load = [os.getloadavg()[0]]
        directs = [direct(model_dir, root / "direct-1")]
        first, second = through_service(data_dir, root / "serve.log", jobs=2)
        directs.append(direct(model_dir, root / "direct-2"))
        load.append(os.getloadavg()[0])
    # Each job against the direct run next to it in time, so that a load that comes and goes on a shared
    # machine weighs on both sides of a ratio alike.
    direct_s, warm_direct_s = directs
    service_s, warm_s = first["service_s"], second["service_s"]
    return {
        "overhead_ratio": round(service_s / direct_s, 3),
        "service_s": round(service_s, 2),
        "direct_s": round(direct_s, 2),
        "overhead_s": round(service_s - direct_s, 2),
        "target_s": round(1.05 * direct_s + 3, 2),
        "meets_target": service_s <= 1.05 * direct_s + 3,
        "warm_overhead_ratio": round(warm_s / warm_direct_s, 3),
        "warm_meets_target": warm_s <= 1.05 * warm_direct_s + 3,
        "warm_service_s": round(warm_s, 2),
        "warm_direct_s": round(warm_direct_s, 2),
        "service_phases_s": {name: round(value, 2) for name, value in first.items() if name != "service_s"},
        "warm_service_phases_s": {
            name: round(value, 2) for name, value in second.items() if name != "service_s"
        },
        "import_s": round(import_s, 2),
        "load_1m": [round(value, 2) for value in load],  # the machine's load average, before and after
        "job": {
            "model": MODEL,
            "data": DATASET.name,
            "training_config": TRAINING_CONFIG,
            "peft_config": PEFT_CONFIG,
        },
    }
