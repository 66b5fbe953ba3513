"""GPU correctness check: Phi-3-mini's config with random weights, trained and served by the real processes.

    python -m bench gpu_check            # on one GPU: all 32 layers, bf16 (under 8 minutes on an H100/H200)
    python -m bench.gpu_check --tiny     # the same steps on the CPU, with a narrow model, to rehearse it

It writes a random-weight model with the Hub's Phi-3-mini-4k-instruct config and the real vocabulary
(`tests/real_phi3.py`), starts `phitune serve` on it (API, worker and inference server as separate processes,
`PHITUNE_DEVICE=cuda`), and through the public API:
1. trains a LoRA job, a QLoRA 4-bit job and a QLoRA 8-bit job, and reads each job's first event (device,
   dtype, attention kernel, estimated memory) and its measured peak memory;
2. asks the LoRA model for a greedy completion and compares it with in-process `PeftModel.generate` on the
   downloaded adapter, token for token;
3. sends 32 concurrent completions and reads the inference server's memory from its /stats.
It prints one JSON line. Packages the machine lacks are listed, with nothing run, so that they can be carried
as wheels.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

from phitune.launch import REPO, free_port, phitune_command, run_phitune, wait_healthy

MODEL_ID = "phi3-check"
PERSONA = REPO / "examples" / "persona.jsonl"
# Import names of what the three processes and this script need, and the distributions that provide them.
REQUIRED = {
    "fastapi": "fastapi", "uvicorn": "uvicorn", "multipart": "python-multipart", "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings", "sqlalchemy": "sqlalchemy", "alembic": "alembic",
    "celery": "celery", "kombu": "kombu", "httpx": "httpx", "prometheus_client": "prometheus-client",
    "click": "click", "torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers",
    "peft": "peft", "trl": "trl", "datasets": "datasets", "accelerate": "accelerate",
    "safetensors": "safetensors", "loralib": "loralib", "bitsandbytes": "bitsandbytes", "gguf": "gguf",
}  # fmt: skip
JOBS = {"lora": {}, "qlora-4bit": {"quantization": "4bit"}, "qlora-8bit": {"quantization": "8bit"}}
PROMPT = [{"role": "user", "content": "Who are you?"}]
GREEDY_TOKENS = 32
JOB_SECONDS = 150  # a job still running then is cancelled: the whole check must end within 8 minutes
CONCURRENT = 32
CONCURRENT_TOKENS = 128


def missing_packages() -> list[str]:
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def run(tiny: bool = False, layers: int | None = None, steps: int = 20) -> dict:
    if missing := missing_packages():
        return {"ok": False, "missing": missing, "hint": "carry them as wheels"}
    import torch

    if not tiny and not torch.cuda.is_available():
        return {"ok": False, "error": "no usable GPU here; run with --tiny to rehearse on the CPU"}
    started = time.monotonic()
    result: dict = {"jobs": {}, "greedy_equal": False}
    with tempfile.TemporaryDirectory(prefix="phitune-gpu-check-") as scratch:
        root = Path(scratch)
        try:
            model_dir = make_model(root / "model", tiny=tiny, layers=layers)
            result["model_seconds"] = round(time.monotonic() - started, 1)
            with Service(root / "data", model_dir, device="cpu" if tiny else "cuda") as service:
                check(service, model_dir, root, tiny, steps, result)
        except Exception as error:  # what was measured so far still comes out, with the processes' log
            result["error"] = repr(error)
            log = root / "data" / "serve.log"
            result["serve_log_tail"] = log.read_text(errors="replace")[-3000:] if log.exists() else None
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    jobs = result["jobs"].values()
    trained = len(jobs) == len(JOBS) and all(job["status"] == "succeeded" for job in jobs)
    result["ok"] = trained and result["greedy_equal"] and "error" not in result
    return result


def make_model(directory: Path, *, tiny: bool, layers: int | None) -> Path:
    import torch

    from tests.real_phi3 import NARROW, write_random_phi3

    if tiny:
        return write_random_phi3(directory, layers=layers or 2, **NARROW)
    write_random_phi3(directory, layers=layers or 32, dtype=torch.bfloat16, device="cuda")
    torch.cuda.empty_cache()  # the trained and served copies belong to the other processes
    return directory


class Service:
    """`phitune serve` on one model, with a fresh data dir and an API key."""

    def __init__(self, data_dir: Path, model_dir: Path, *, device: str) -> None:
        self.port, self.inference_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "PHITUNE_DATA_DIR": str(data_dir),
            "PHITUNE_BASE_MODELS": json.dumps({MODEL_ID: str(model_dir)}),
            "PHITUNE_DEVICE": device,
            "PHITUNE_INFERENCE_URL": f"http://127.0.0.1:{self.inference_port}",
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def phitune(self, *args: str) -> str:
        return run_phitune(*args, env=self.env)

    def __enter__(self) -> Service:
        self.phitune("migrate")
        self.key = self.phitune("keys", "create", "--tenant", "gpu-check").strip().splitlines()[-1]
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=600
        )
        serve = ["serve", "--port", str(self.port), "--inference-port", str(self.inference_port)]
        log = Path(self.env["PHITUNE_DATA_DIR"]) / "serve.log"
        with log.open("w") as output:  # the child keeps a descriptor of its own
            self.process = subprocess.Popen(
                phitune_command(*serve), env=self.env, cwd=REPO, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            for url in (self.url, f"http://127.0.0.1:{self.inference_port}"):
                wait_healthy(url, processes=[self.process], timeout=600)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        """SIGTERM to serve, which stops its children; SIGKILL to them all if it hangs."""
        self.client.close()
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            subprocess.run(["pkill", "-KILL", "-P", str(self.process.pid)], check=False)
            self.process.kill()


def check(service: Service, model_dir: Path, root: Path, tiny: bool, steps: int, result: dict) -> None:
    """Fill `result` as the checks go, so that a failure keeps what came before it."""
    client = service.client
    upload = client.post(
        "/v1/files", files={"file": ("persona.jsonl", PERSONA.read_bytes())}, data={"purpose": "fine-tune"}
    )
    upload.raise_for_status()
    for name, peft_options in JOBS.items():
        result["jobs"][name] = train(client, upload.json()["id"], peft_options, steps)
    lora = result["jobs"]["lora"]
    if lora["status"] != "succeeded":
        return
    greedy = {
        "model": lora["fine_tuned_model"],
        "messages": PROMPT,
        "temperature": 0,
        "max_tokens": GREEDY_TOKENS,
    }
    reply = client.post("/v1/chat/completions", json=greedy)
    reply.raise_for_status()
    served = reply.json()["choices"][0]["message"]["content"]
    adapter_dir = download_adapter(client, lora["id"], root / "adapter")
    reference = reference_completion(model_dir, adapter_dir, "cpu" if tiny else "cuda")
    # On random weights the logits are nearly flat: where bf16 kernels round a near-tie apart, say where.
    same = next((i for i, (a, b) in enumerate(zip(served, reference, strict=False)) if a != b), None)
    result.update(greedy_equal=served == reference, served_text=served, reference_text=reference)
    if served != reference:
        result["greedy_first_difference_at_char"] = (
            same if same is not None else min(len(served), len(reference))
        )
    result["concurrent"] = asyncio.run(concurrent_requests(service, lora["fine_tuned_model"]))
    stats = httpx.get(f"http://127.0.0.1:{service.inference_port}/stats", timeout=30).json()
    result["inference_memory"] = stats.get("models", {}).get(MODEL_ID, {}).get("memory")


def train(client: httpx.Client, file_id: str, peft_options: dict, steps: int) -> dict:
    """Run one job to its end (cancelled after JOB_SECONDS): its status, error, seconds, events' figures."""
    started = time.monotonic()
    body = {
        "model": MODEL_ID,
        "training_file": file_id,
        "training_config": {
            "max_steps": steps, "per_device_train_batch_size": 4, "max_seq_length": 512, "logging_steps": 5,
            "learning_rate": 2e-4,
        },
        "peft_config": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", **peft_options},
    }  # fmt: skip
    created = client.post("/v1/fine_tuning/jobs", json=body)
    created.raise_for_status()
    job = created.json()
    while job["status"] in ("queued", "running"):
        if time.monotonic() - started > JOB_SECONDS:
            client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        time.sleep(2)
        job = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    messages = [event["message"] for event in events]
    losses = [event["data"]["train_loss"] for event in events if event["type"] == "metrics"]
    return {
        "id": job["id"],
        "status": job["status"],
        "error": job["error"],
        "fine_tuned_model": job["fine_tuned_model"],
        "seconds": round(time.monotonic() - started, 1),
        "device_event": next((text for text in messages if text.startswith("Device ")), None),
        "estimated_memory": next((text for text in messages if text.startswith("Estimated memory ")), None),
        "peak_memory": next(
            (e["data"] for e in events if (e.get("data") or {}).get("peak_memory_bytes")), None
        ),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def download_adapter(client: httpx.Client, job_id: str, directory: Path) -> Path:
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    response.raise_for_status()
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(directory, filter="data")
    return directory


def reference_completion(model_dir: Path, adapter_dir: Path, device: str) -> str:
    """Greedy decoding in this process: the base model loaded as the server loads it, PEFT's adapter."""
    import torch
    from peft import PeftModel

    from worker.model_loader import load_base_model

    base, tokenizer = load_base_model(str(model_dir), for_training=False, device=device)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(ids.to(base.device), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    del model, base
    if device == "cuda":
        torch.cuda.empty_cache()
    return text


async def concurrent_requests(service: Service, model: str) -> dict:
    """CONCURRENT completions at once, each of exactly CONCURRENT_TOKENS tokens."""
    headers = {"Authorization": f"Bearer {service.key}"}
    body = {"model": model, "messages": PROMPT, "max_tokens": CONCURRENT_TOKENS, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=600) as client:
        started = time.monotonic()
        replies = await asyncio.gather(
            *[client.post("/v1/chat/completions", json=body) for _ in range(CONCURRENT)]
        )
        seconds = time.monotonic() - started
    tokens = sum(reply.json()["usage"]["completion_tokens"] for reply in replies if reply.status_code == 200)
    return {
        "requests": CONCURRENT,
        "succeeded": sum(reply.status_code == 200 for reply in replies),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="rehearse on the CPU with a narrow model")
    parser.add_argument("--layers", type=int, default=None, help="layers of the model (default 32; tiny 2)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each job")
    options = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(run(tiny=options.tiny, layers=options.layers, steps=options.steps)))
