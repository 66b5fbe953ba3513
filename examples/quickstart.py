"""`make quickstart`: a real fine-tune on the tiny Phi-3, end to end, with the `phitune` CLI.

Starts `phitune serve`, creates an API key, then runs the commands a user would type, each shown before its
output: upload examples/persona.jsonl, create a LoRA job and watch it train (the live progress bar), download
the adapter, show that it loads with PEFT, and ask the base model and the fine-tuned one the same question.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

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


def start_service(port: int) -> subprocess.Popen:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    log = (DATA_DIR / "serve.log").open("w")
    server = subprocess.Popen(
        phitune_command("serve", "--port", str(port), "--inference-port", str(free_port())),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", processes=[server], timeout=180)
    except RuntimeError as problem:
        sys.exit(f"{problem}; see {DATA_DIR / 'serve.log'}")
    return server


def phitune(*args: str, shown: bool = True, capture: bool = False) -> str:
    """Run `phitune ARGS` (shown as typed, its output passed through unless captured); exit if it fails."""
    if shown:
        print(f"\n$ phitune {shlex.join(args)}", flush=True)
    done = subprocess.run(phitune_command(*args), stdout=subprocess.PIPE if capture else None, text=True)
    if done.returncode != 0:
        sys.exit(f"phitune {args[0]} failed with status {done.returncode}")
    return done.stdout or ""


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


def main() -> None:
    started = time.monotonic()
    port = free_port()
    print(f"Starting phitune serve on port {port} (data in {DATA_DIR}) ...")
    # Every `phitune` command below talks to this server (the CLI reads PHITUNE_BASE_URL and PHITUNE_API_KEY).
    os.environ["PHITUNE_BASE_URL"] = f"http://127.0.0.1:{port}"
    server = start_service(port)
    try:
        created = phitune("keys", "create", "--tenant", "quickstart", capture=True)
        print(created, end="")
        os.environ["PHITUNE_API_KEY"] = created.split()[-1]  # the key is the last line
        uploaded = phitune("files", "upload", os.path.relpath(DATASET), capture=True)
        print(uploaded, end="")
        file_id = uploaded.split()[-1]  # the file's id is the last line
        job = json.loads(
            phitune(
                "jobs",
                "create",
                "--model",
                "tiny-phi3",
                "--training-file",
                file_id,
                "--suffix",
                "persona",
                "--training-config",
                json.dumps(TRAINING_CONFIG),
                "--peft-config",
                json.dumps(PEFT_CONFIG),
                "--json",
                capture=True,
            )
        )
        print(f"Created {job['id']} ({job['status']})")
        phitune("jobs", "watch", job["id"])
        job = json.loads(phitune("jobs", "get", job["id"], "--json", shown=False, capture=True))
        adapters = DATA_DIR / "adapters"
        adapters.mkdir(parents=True, exist_ok=True)
        archive = adapters / f"{job['id']}.tar.gz"
        phitune("jobs", "download", job["id"], "--output", str(archive))
        adapter_dir = adapters / job["id"]
        with tarfile.open(archive) as tar:
            tar.extractall(adapter_dir, filter="data")
        matrices = check_adapter_loads(adapter_dir, DATA_DIR / "models" / "tiny-phi3")
        print(f"  The adapter loads with peft.PeftModel.from_pretrained ({matrices} LoRA B matrices).")
        for model in ["tiny-phi3", job["fine_tuned_model"]]:
            phitune("chat", model, QUESTION, "--temperature", "0", "--max-tokens", "60")
        events = json.loads(
            phitune("jobs", "events", job["id"], "--limit", "100", "--json", shown=False, capture=True)
        )
        loss = next(e["data"]["train_loss"] for e in events["data"] if e["type"] == "metrics")  # newest first
        print(
            f"\nDone in {time.monotonic() - started:.0f} s.\n  job id       : {job['id']}\n"
            f"  model        : {job['fine_tuned_model']}\n  final loss   : {loss:.4f}\n"
            f"  adapter      : {adapter_dir}"
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
