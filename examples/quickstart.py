"""`make quickstart`: a real fine-tune on the tiny Phi-3, end to end, through the public API.

Starts `phitune serve`, creates an API key, uploads examples/persona.jsonl, trains a LoRA adapter while
showing the live loss, downloads the adapter, shows that it loads with PEFT, then asks the base model and
the fine-tuned model the same question through /v1/chat/completions.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import httpx

from phitune.launch import free_port, phitune_command, wait_healthy

HERE = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("PHITUNE_DATA_DIR", ".phitune")).resolve()
DATASET = HERE / "persona.jsonl"
QUESTION = "Who are you?"
# Tuned so the random tiny model learns the persona word for word in well under a minute on two CPU cores;
# a real Phi-3 wants the defaults (learning_rate 2e-4, 3 epochs).
TRAINING_CONFIG = {
    "num_train_epochs": 60,
    "learning_rate": 0.01,
    "per_device_train_batch_size": 8,
    "logging_steps": 10,
}
PEFT_CONFIG = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def phitune(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(phitune_command(*args), **popen)


def start_service(port: int) -> subprocess.Popen:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    log = (DATA_DIR / "serve.log").open("w")
    server = phitune(
        "serve",
        "--port",
        str(port),
        "--inference-port",
        str(free_port()),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", processes=[server], timeout=180)
    except RuntimeError as problem:
        sys.exit(f"{problem}; see {DATA_DIR / 'serve.log'}")
    return server


def create_key() -> str:
    output = phitune("keys", "create", "--tenant", "quickstart", stdout=subprocess.PIPE, text=True)
    stdout, _ = output.communicate()
    return stdout.strip().splitlines()[-1]


def follow(client: httpx.Client, job_id: str) -> float | None:
    """Draw a progress bar from the live event stream until the job ends; return the last train loss."""
    loss, bar_drawn = None, False
    with client.stream(
        "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}, timeout=None
    ) as s:
        for line in s.iter_lines():
            if not line.startswith('data: {"'):
                continue
            event = json.loads(line[6:])
            data = event.get("data") or {}
            if event["type"] == "metrics" and data.get("train_loss") is not None:
                loss = data["train_loss"]
                bar = "#" * int(30 * data["step"] / max(data["total_steps"], 1))
                print(
                    f"\r  [{bar:<30}] step {data['step']}/{data['total_steps']}  loss {loss:.3f}",
                    end="",
                    flush=True,
                )
                bar_drawn = True
            elif event["type"] == "message":
                print(("\n" if bar_drawn else "") + f"  {event['message']}", flush=True)
                bar_drawn = False
    return loss


def check_adapter_loads(adapter_dir: Path, base_dir: Path) -> int:
    """Load base + adapter with PEFT, as a user would; returns how many LoRA matrices it trained."""
    # bitsandbytes, imported by peft, would say that its optional CPU kernels package is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        tuned = model(**prompt).logits
        with model.disable_adapter():
            base = model(**prompt).logits
    if torch.allclose(tuned, base):
        sys.exit("the adapter did not change the model's output")
    return sum(1 for name, _ in model.named_parameters() if "lora_B" in name)


def chat(client: httpx.Client, model: str) -> str:
    """One greedy answer to QUESTION through the OpenAI-compatible chat endpoint."""
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": 60,
        },
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def main() -> None:
    started = time.monotonic()
    port = free_port()
    print(f"Starting phitune serve on port {port} (data in {DATA_DIR}) ...")
    server = start_service(port)
    try:
        key = create_key()
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
        with DATASET.open("rb") as body:
            uploaded = client.post(
                "/v1/files", files={"file": (DATASET.name, body)}, data={"purpose": "fine-tune"}
            )
        uploaded.raise_for_status()
        file = uploaded.json()
        print(f"Uploaded {DATASET.name}: {file['stats']['examples']} examples ({file['id']})")
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny-phi3",
                "training_file": file["id"],
                "suffix": "persona",
                "training_config": TRAINING_CONFIG,
                "peft_config": PEFT_CONFIG,
            },
        )
        job.raise_for_status()
        job_id = job.json()["id"]
        print(f"Created job {job_id}; training:")
        loss = follow(client, job_id)
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] != "succeeded":
            sys.exit(f"job {job_id} ended {job['status']}: {job['error']}")
        archive = client.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
        archive.raise_for_status()
        adapter_dir = DATA_DIR / "adapters" / job_id
        with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
            tar.extractall(adapter_dir, filter="data")
        matrices = check_adapter_loads(adapter_dir, DATA_DIR / "models" / "tiny-phi3")
        print(f"\n  The adapter loads with peft.PeftModel.from_pretrained ({matrices} LoRA B matrices).")
        print(f"\n  Q: {QUESTION}   (POST /v1/chat/completions)")
        print(f"  tiny-phi3 (base)      : {chat(client, 'tiny-phi3')!r}")
        print(f"  {job['fine_tuned_model']}: {chat(client, job['fine_tuned_model'])!r}")
        print(
            f"\nDone in {time.monotonic() - started:.0f} s.\n  job id       : {job_id}\n"
            f"  model        : {job['fine_tuned_model']}\n  final loss   : {loss:.4f}\n"
            f"  adapter      : {adapter_dir}"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
